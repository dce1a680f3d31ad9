// Loaded before the stylesheet paints: apply the stored light/dark choice (else follow the system).
try {
  var t = localStorage.getItem('presque.theme');
  if (t === 'dark' || t === 'light') document.documentElement.dataset.theme = t;
} catch (e) {
  // no storage: follow the system
}
