// Shared by every view module: frontend.esm_source puts this file before the view's own code, so each view
// module (anywidget, Panel component or static export) carries one copy and the views never drift apart.

// Token text as drawn: whitespace and control characters made visible, so "\n" and " " are not blank columns.
const VISIBLE = { " ": "·", "\n": "↵", "\t": "⇥", "\r": "␍" };
function visibleToken(text) {
  if (text === "") return "∅";
  return Array.from(text, (ch) => {
    if (ch in VISIBLE) return VISIBLE[ch];
    const code = ch.codePointAt(0);
    if (code < 32) return String.fromCodePoint(0x2400 + code); // control pictures block
    if (code === 127) return "␡";
    if (code >= 0x80 && code < 0xa0) return `\\x${code.toString(16)}`; // C1 controls have no glyph
    if (code === 0xa0) return "⍽"; // no-break space
    return ch;
  }).join("");
}

// A DOM element with an optional class and text.
function el_(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
