// octa3d review page: subjects table (sort, filter, keyboard) and the NiiVue viewer of one subject at a time.
// Data: window.OCTA3D (written by octa3d/review/page.py); volumes: subjects/<stem>.js, loaded when opened.
"use strict";
(function () {
  const D = window.OCTA3D;
  const $ = (id) => document.getElementById(id);
  const tbody = $("rows");
  const rows = () => Array.from(tbody.querySelectorAll("tr"));
  const visible = () => rows().filter((r) => !r.hidden);
  let nv = null, current = -1, sortState = {col: -1, dir: 1};

  function sortBy(col, dir) {
    sortState = {col: col, dir: dir};
    const key = (r) => r.children[col].dataset.v;
    const arr = rows();
    arr.sort((a, b) => {
      const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return dir * (c || (+a.dataset.idx - +b.dataset.idx));
    });
    arr.forEach((r) => tbody.appendChild(r));
    document.querySelectorAll("#subjects th").forEach((th, i) => {
      th.dataset.sorted = i === col ? (dir > 0 ? "asc" : "desc") : "";
    });
  }

  function filter() {
    const only = $("only-errors").checked;
    rows().forEach((r) => { r.hidden = only && r.dataset.correct !== "0"; });
    $("n-shown").textContent = visible().length + " of " + rows().length + " shown";
  }

  function setStatus(text) { $("viewer-status").textContent = text; }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error("could not load " + src));
      document.head.appendChild(s);
    });
  }

  async function ensureViewer() {
    if (nv) return nv;
    nv = new niivue.Niivue({backColor: [0.05, 0.05, 0.08, 1], show3Dcrosshair: true, isColorbar: true,
      isRuler: true, dragAndDropEnabled: false, multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS,
      crosshairColor: [0.2, 0.9, 1.0, 1]});
    await nv.attachToCanvas($("gl"));
    nv.setSliceType(nv.sliceTypeMultiplanar);
    return nv;
  }

  function applyOverlay() {
    if (!nv || nv.volumes.length < 2) return;
    const cam = nv.volumes[1];
    cam.cal_min = +$("threshold").value;
    cam.cal_max = 255;
    nv.setOpacity(1, $("overlay-on").checked ? +$("opacity").value / 100 : 0);
    nv.updateGLVolume();
  }

  async function openSubject(i) {
    const s = D.subjects[i];
    if (!s) return;
    current = i;
    rows().forEach((r) => r.classList.toggle("current", +r.dataset.idx === i));
    $("viewer").hidden = false;
    $("subject-title").textContent = s.id + " \u2014 true " + (s.label || "?") + ", predicted " + s.prediction
      + (s.ood ? " \u2014 out of distribution: " + s.ood : "");
    const links = $("subject-files");
    links.textContent = "";
    s.files.forEach((f) => {
      const a = document.createElement("a");
      a.href = f.href;
      a.textContent = f.name;
      links.appendChild(a);
      links.appendChild(document.createTextNode(" "));
    });
    const sheet = $("sheet");
    sheet.hidden = !s.sheet;
    if (s.sheet) { sheet.src = s.sheet; $("sheet-link").href = s.sheet; }
    $("controls").hidden = !s.has_map;
    if (!s.volumes) {
      $("gl-box").hidden = true;
      setStatus(s.reason);
      return;
    }
    $("gl-box").hidden = false;
    setStatus("loading " + s.id + " \u2026");
    try {
      if (!(window.OCTA3D_VOLUMES && window.OCTA3D_VOLUMES[s.id])) await loadScript(s.volumes);
      const v = window.OCTA3D_VOLUMES[s.id];
      const viewer = await ensureViewer();
      while (viewer.volumes.length) viewer.removeVolume(viewer.volumes[0]);
      const scan = await niivue.NVImage.loadFromBase64({base64: v.scan, name: "scan.nii.gz", colormap: "gray"});
      scan.colorbarVisible = false;
      viewer.addVolume(scan);
      if (v.cam) {
        const cam = await niivue.NVImage.loadFromBase64({base64: v.cam, name: "map.nii.gz", colormap: "warm",
          opacity: 0.5, cal_min: 1, cal_max: 255});
        viewer.addVolume(cam);
        applyOverlay();
      }
      if (v.peak) {
        viewer.scene.crosshairPos = viewer.vox2frac(v.peak);
        viewer.updateGLVolume();
      }
      if (current === i) setStatus(s.reason || ("viewer volume " + v.shape.join("\u00d7") + " voxels (scan " +
        v.source_shape.join("\u00d7") + "); crosshair at the map's peak" + (v.peak ? "" : " (no peak)")));
      document.body.dataset.loaded = s.id;
    } catch (e) {
      setStatus("could not show " + s.id + ": " + e.message);
      throw e;
    }
  }

  function step(d) {
    const vis = visible();
    if (!vis.length) return Promise.resolve();
    const pos = vis.findIndex((r) => +r.dataset.idx === current);
    const next = vis[Math.min(vis.length - 1, Math.max(0, pos < 0 ? 0 : pos + d))];
    next.scrollIntoView({block: "nearest"});
    return openSubject(+next.dataset.idx);
  }

  async function selftest(out) {
    const res = {};
    const ids = () => visible().map((r) => D.subjects[+r.dataset.idx].id);
    res.rows = rows().length;
    const errs = rows().map((r) => r.dataset.correct === "0");
    res.errors_first = errs.every((e, i) => i === 0 || !e || errs[i - 1]);
    const th = document.querySelectorAll("#subjects th");
    th[0].click();
    const asc = ids();
    res.sort_id_asc = asc.join("|") === asc.slice().sort((a, b) => a.localeCompare(b)).join("|");
    th[0].click();
    res.sort_id_desc = ids().join("|") === asc.slice().reverse().join("|");
    $("only-errors").click();
    res.only_errors_rows = visible().length;
    res.n_errors = errs.filter(Boolean).length;
    $("only-errors").click();
    res.rows_after_filter_off = visible().length;
    const want = new URLSearchParams(location.hash.slice(1)).get("subject");
    const idx = want !== null ? D.subjects.findIndex((s) => s.id === want) : 0;
    await openSubject(idx);
    res.opened = D.subjects[idx].id;
    res.volumes = nv ? nv.volumes.length : 0;
    if (res.volumes > 1) {
      res.overlay_opacity_on = nv.volumes[1].opacity;
      $("overlay-on").click();
      res.overlay_opacity_off = nv.volumes[1].opacity;
      $("overlay-on").click();
    }
    res.status = $("viewer-status").textContent;
    const box = $("gl").getBoundingClientRect();  // where the viewer is, to crop a screenshot of the same layout
    res.canvas = [box.left, box.top, box.width, box.height].map(Math.round);
    res.done = true;
    out.textContent = JSON.stringify(res);
  }

  document.querySelectorAll("#subjects th").forEach((th, i) => {
    th.addEventListener("click", () => sortBy(i, sortState.col === i ? -sortState.dir : 1));
  });
  $("only-errors").addEventListener("change", filter);
  tbody.addEventListener("click", (e) => {
    const r = e.target.closest("tr");
    if (r && e.target.tagName !== "A") openSubject(+r.dataset.idx);
  });
  ["opacity", "threshold", "overlay-on"].forEach((id) => $(id).addEventListener("input", applyOverlay));
  $("overlay-on").addEventListener("change", applyOverlay);
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.target.type !== "checkbox") return;
    if (e.key === "j" || e.key === "ArrowDown") { e.preventDefault(); step(1); }
    if (e.key === "k" || e.key === "ArrowUp") { e.preventDefault(); step(-1); }
  });
  filter();
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("selftest")) {
    const out = $("selftest-result");
    selftest(out).catch((e) => { out.textContent = JSON.stringify({error: String(e)}); });
  } else if (params.get("subject") !== null) {
    const idx = D.subjects.findIndex((s) => s.id === params.get("subject"));
    if (idx >= 0) openSubject(idx);
  } else if (tbody.rows.length) {
    openSubject(+tbody.rows[0].dataset.idx);  // the first row: the viewer is never an empty pane
  }
})();
