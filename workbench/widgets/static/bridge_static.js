// Static HTML export: the state is frozen into the page (window.__WB_STATE__[id]); changes stay local to the page.
for (const host of document.querySelectorAll(`[data-wb-esm="${WB_ESM_NAME}"]`)) {
  const state = window.__WB_STATE__[host.dataset.wbView];
  const listeners = {};
  draw(host, {
    get: (name) => state[name],
    set: (name, value) => { state[name] = value; (listeners[name] || []).forEach((f) => f()); },
    on: (name, callback) => { (listeners[name] = listeners[name] || []).push(callback); },
  });
}
