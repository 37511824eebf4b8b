// MathJax 2 configuration for pymdownx.arithmatex (generic mode): typeset only the
// \( ... \) and \[ ... \] spans that arithmatex marks with class "arithmatex".
window.MathJax = {
  jax: ["input/TeX", "output/CommonHTML"],
  extensions: ["tex2jax.js"],
  TeX: { extensions: ["AMSmath.js", "AMSsymbols.js"] },
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    ignoreClass: ".*|",
    processClass: "arithmatex",
  },
  showMathMenu: false,
  messageStyle: "none",
};
