// anywidget host: model.get / model.set + save_changes / model.on("change:name").
export default {
  render({ model, el }) {
    draw(el, {
      get: (name) => model.get(name),
      set: (name, value) => { model.set(name, value); model.save_changes(); },
      on: (name, callback) => model.on(`change:${name}`, callback),
    });
  },
};
