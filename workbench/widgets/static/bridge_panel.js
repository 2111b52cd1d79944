// Panel JSComponent host (`workbench serve`): parameters are properties of `model`; model.on(name) watches one.
export function render({ model, el }) {
  draw(el, {
    get: (name) => model[name],
    set: (name, value) => { model[name] = value; },
    on: (name, callback) => model.on(name, callback),
  });
}
