// vspan dashboard: polls the API every few seconds and redraws. No library, no CDN.
"use strict";

(() => {
  const API = "/api/v1";
  const params = new URLSearchParams(location.search);
  const POLL_MS = Number(params.get("poll") || 5000);
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) localStorage.setItem("vspan-token", hash.get("token"));
  const token = localStorage.getItem("vspan-token");
  const $ = (sel) => document.querySelector(sel);
  if (params.get("bin")) $("#bin").value = params.get("bin");
  if (params.get("window")) $("#window").value = params.get("window");
  let available = null;  // paths the API serves (from /openapi.json)
  let busy = false;
  let polls = 0;

  function headers(extra) {
    return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
  }

  async function get(path) {
    const response = await fetch(path, { headers: headers() });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function query(extra) {
    const q = new URLSearchParams(extra || {});
    const since = $("#window").value;
    if (since) q.set("since", since);
    return q.toString();
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function fill(tbody, rows, render) {
    tbody.replaceChildren();
    for (const row of rows) {
      const tr = document.createElement("tr");
      render(tr, row);
      tbody.appendChild(tr);
    }
  }

  const time = (iso) => (iso ? String(iso).replace("T", " ").slice(0, 19) : "");

  function drawHosts(hosts, cells) {
    const bins = [...new Set(cells.map((c) => c.time))].sort((a, b) => a - b);
    const charts = $("#host-charts");
    charts.replaceChildren();
    for (const host of hosts) {
      const intra = bins.map(() => 0);
      const cross = bins.map(() => 0);
      for (const c of cells) {
        const i = bins.indexOf(c.time);
        if (c.src === host.name && c.dst === host.name) intra[i] += c.intra_bytes;
        if (c.src === host.name || c.dst === host.name) cross[i] += c.cross_bytes;
      }
      const box = document.createElement("div");
      box.className = "chart";
      box.dataset.host = host.name;
      box.dataset.intra = String(intra.reduce((a, b) => a + b, 0));
      box.dataset.cross = String(cross.reduce((a, b) => a + b, 0));
      const title = document.createElement("h4");
      title.textContent = `${host.name} (${host.vms} VMs)`;
      box.appendChild(title);
      VChart.stacked(box, bins, [
        { kind: "intra", values: intra },
        { kind: "cross", values: cross },
      ]);
      charts.appendChild(box);
    }
    fill($("#host-table tbody"), hosts, (tr, h) => {
      tr.dataset.host = h.name;
      cell(tr, h.name);
      cell(tr, h.vms, "num");
      cell(tr, h.flows, "num");
      cell(tr, h.intra_bytes, "num intra");
      cell(tr, h.cross_bytes, "num cross");
      cell(tr, h.bytes, "num");
    });
  }

  function drawMatrix(hosts, cells) {
    const sums = new Map();
    for (const c of cells) {
      const key = `${c.src}\u0000${c.dst}`;
      const got = sums.get(key) || { src: c.src, dst: c.dst, bytes: 0 };
      got.bytes += c.bytes;
      sums.set(key, got);
    }
    const names = hosts.map((h) => h.name);
    for (const c of sums.values()) {
      for (const n of [c.src, c.dst]) if (!names.includes(n)) names.push(n);
    }
    VChart.heatmap($("#matrix .heat"), names, [...sums.values()]);
  }

  async function drawCollectors() {
    const note = $("#collectors .note");
    if (!available.has(`${API}/collectors`)) {
      note.hidden = false;
      note.textContent = "the collectors API is not served by this analyzer";
      return;
    }
    const { collectors } = await get(`${API}/collectors`);
    const sum = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
    // "kernel 3, queue_full 2": the non-zero reasons, for the cell's tooltip
    const reasons = (counts) => Object.entries(counts || {}).filter(([, n]) => n)
      .map(([k, n]) => `${k} ${n}`).join(", ") || "none";
    fill($("#collectors tbody"), collectors, (tr, c) => {
      tr.dataset.collector = c.collector_id;
      tr.dataset.loss = c.loss;
      tr.dataset.lost = c.lost;
      tr.dataset.kernel = c.kernel;
      tr.dataset.missedWhileDown = c.missed_while_down;
      cell(tr, c.collector_id);
      cell(tr, c.frames, "num");
      cell(tr, c.lost, "num");
      cell(tr, c.kernel, "num");
      cell(tr, c.missed_while_down, "num");
      const cap = c.capture;
      tr.dataset.captureDrops = cap ? sum(cap.drops) : "";
      tr.dataset.notMirrored = cap ? sum(cap.not_mirrored) : "";
      cell(tr, cap ? sum(cap.drops) : "", "num").title = cap ? reasons(cap.drops) : "";
      cell(tr, cap ? sum(cap.not_mirrored) : "", "num").title =
        cap ? reasons(cap.not_mirrored) : "";
      cell(tr, `${(100 * c.loss).toFixed(2)} %`, "num");
      cell(tr, c.invalid, "num");
    });
    const line = $("#analyzer-drops");
    if (!available.has(`${API}/status`)) {
      line.textContent = "";
      return;
    }
    const { drops } = await get(`${API}/status`);
    if (!drops) return;
    const back = drops.backpressure || {};
    line.dataset.kernel = drops.kernel;
    line.dataset.missedWhileDown = drops.missed_while_down;
    line.dataset.ringFrames = back.ring_frames;
    line.dataset.storeFlows = back.store_flows;
    line.textContent = `analyzer drops — socket buffer full: ${drops.kernel} datagrams; ` +
      `packet ring behind: ${back.ring_frames} frames; store behind: ${back.store_flows} flows; ` +
      `sent while it was stopped: ${drops.missed_while_down} messages`;
  }

  async function drawViolations() {
    const note = $("#violations .note");
    if (!available.has(`${API}/violations`)) {
      note.hidden = false;
      note.textContent = "the violations API is not served by this analyzer";
      return;
    }
    const { violations } = await get(`${API}/violations?${query({ limit: 20 })}`);
    note.hidden = violations.length > 0;
    note.textContent = "no denied flows in the window";
    fill($("#violations tbody"), violations, (tr, f) => {
      tr.dataset.flow = f.flow_uid;
      cell(tr, time(f.last));
      cell(tr, f.src_vm || f.src_ip);
      cell(tr, f.dst_vm || f.dst_ip);
      cell(tr, f.proto);
      cell(tr, f.dst_port);
      cell(tr, f.policy_rule, "deny");
      cell(tr, f.bytes + f.bytes_rev, "num");
    });
  }

  async function drawVm(vms) {
    const select = $("#vm-select");
    const chosen = select.value || params.get("vm") || (vms[0] && vms[0].name);
    select.replaceChildren(...vms.map((v) => new Option(`${v.name} (${v.host})`, v.name)));
    if (!chosen) return;
    select.value = chosen;
    const vm = await get(`${API}/vms/${encodeURIComponent(chosen)}?${query()}`);
    const link = $("#pcap-link");
    link.href = `${API}/pcap?vm=${encodeURIComponent(vm.name)}`;
    link.setAttribute("download", `${vm.name}.pcapng`);
    const t = vm.traffic;
    const facts = [["host", vm.host], ["profile", vm.profile || "—"],
      ["vifs", vm.vifs.map((v) => v.vif).join(", ")], ["flows", t.flows],
      ["bytes", t.bytes], ["sent", t.bytes_sent], ["received", t.bytes_received],
      ["intra-host", t.intra_bytes], ["cross-host", t.cross_bytes]];
    const summary = $("#vm-summary");
    summary.dataset.vm = vm.name;
    summary.dataset.bytes = String(t.bytes);
    summary.replaceChildren(...facts.map(([k, v]) => {
      const d = document.createElement("div");
      d.dataset.fact = k;
      const b = document.createElement("b");
      b.textContent = String(v);
      d.append(b, k);
      return d;
    }));
    fill($("#vm-flows tbody"), vm.flows, (tr, f) => {
      tr.dataset.flow = f.flow_uid;
      cell(tr, time(f.last));
      cell(tr, f.src_vm === vm.name ? f.dst_vm || f.dst_ip : f.src_vm || f.src_ip);
      cell(tr, f.scope);
      cell(tr, f.proto);
      cell(tr, f.dst_port);
      cell(tr, f.bytes + f.bytes_rev, "num");
      cell(tr, f.policy_verdict, f.policy_verdict === "deny" ? "deny" : "");
      tr.dataset.state = f.state;
      cell(tr, f.state, f.state === "open" ? "open" : "");
    });
    fill($("#vm-hits tbody"), vm.policy_hits, (tr, h) => {
      tr.dataset.rule = h.rule;
      cell(tr, h.rule);
      cell(tr, h.verdict, h.verdict === "deny" ? "deny" : "");
      cell(tr, h.flows, "num");
      cell(tr, h.bytes, "num");
    });
    fill($("#vm-migrations tbody"), vm.migrations, (tr, m) => {
      cell(tr, time(m.time));
      cell(tr, m.from_host || "—");
      cell(tr, m.to_host);
      cell(tr, m.source);
    });
  }

  const SHOWN_BINS = 168;  // measured history drawn before the forecast: a week of hours

  async function drawForecast() {
    const note = $("#fc-note");
    const path = `${API}/predictions/forecast`;
    if (!available.has(path)) {
      note.hidden = false;
      note.textContent = "the predictions API is not served by this analyzer";
      return;
    }
    const doc = await get(`${path}?level=host-pair&bin=3600&horizon=24`);
    const select = $("#fc-pair");
    const names = doc.series.map((s) => s.name);
    const chosen = names.includes(select.value) ? select.value : names[0];
    select.replaceChildren(...names.map((n) => new Option(n, n)));
    const chart = $("#fc-chart");
    note.hidden = names.length > 0;
    note.textContent = doc.note || "no cross-host traffic to forecast";
    if (!chosen) {
      chart.replaceChildren();
      return;
    }
    select.value = chosen;
    const series = doc.series.find((s) => s.name === chosen);
    chart.dataset.series = chosen;
    VChart.band(chart, series.measured.slice(-SHOWN_BINS), series.forecast);
  }

  function fillWhatifForm(hosts, vms) {
    const keep = (select, options) => {
      const value = select.value;
      select.replaceChildren(...options.map(([text, v]) => new Option(text, v)));
      if (options.some(([, v]) => v === value)) select.value = value;
    };
    keep($("#wi-vm"), vms.map((v) => [`${v.name} (${v.host})`, v.name]));
    keep($("#wi-host"), hosts.map((h) => [h.name, h.name]));
  }

  async function whatIf(event) {
    event.preventDefault();
    const note = $("#wi-note");
    const move = { vm: $("#wi-vm").value, host: $("#wi-host").value };
    const response = await fetch(`${API}/predictions/whatif`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ moves: [move] }),
    });
    const doc = await response.json();
    if (!response.ok) {
      note.textContent = typeof doc.detail === "string" ? doc.detail : JSON.stringify(doc.detail);
      return;
    }
    const sign = (v) => (v > 0 ? "up" : v < 0 ? "down" : "");
    const round = (v) => Math.round(v).toLocaleString("en");
    const changed = doc.host_pairs.filter((r) => Math.abs(r.bytes_delta) > 1e-9);
    fill($("#wi-hosts tbody"), changed, (tr, r) => {
      Object.assign(tr.dataset, { src: r.src, dst: r.dst, before: r.bytes_before,
        after: r.bytes_after, delta: r.bytes_delta });
      cell(tr, r.src);
      cell(tr, r.dst);
      cell(tr, r.class);
      cell(tr, round(r.bytes_before), "num");
      cell(tr, round(r.bytes_after), "num");
      cell(tr, (r.bytes_delta > 0 ? "+" : "") + round(r.bytes_delta), `num ${sign(r.bytes_delta)}`);
    });
    fill($("#wi-pairs tbody"), doc.vm_pairs, (tr, r) => {
      Object.assign(tr.dataset, { src: r.src, dst: r.dst, bytes: r.bytes, change: r.change });
      cell(tr, r.src);
      cell(tr, r.dst);
      cell(tr, round(r.bytes), "num");
      cell(tr, r.change);
    });
    note.textContent = `${move.vm} → ${move.host}: ${changed.length} host pairs change`;
    $("#whatif").dataset.done = String(Number($("#whatif").dataset.done || 0) + 1);
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    const status = $("#status");
    try {
      if (available === null) {
        const spec = await get("/openapi.json");
        available = new Set(Object.keys(spec.paths || {}));
      }
      const bin = $("#bin").value;
      const [hosts, matrix, topVms, topPairs, vms] = await Promise.all([
        get(`${API}/hosts?${query()}`),
        get(`${API}/matrix?${query({ level: "host", bin })}`),
        get(`${API}/top?${query({ by: "vm", limit: 10 })}`),
        get(`${API}/top?${query({ by: "vm-pair", limit: 10 })}`),
        get(`${API}/vms?${query()}`),
      ]);
      drawHosts(hosts.hosts, matrix.cells);
      drawMatrix(hosts.hosts, matrix.cells);
      VChart.hbars($("#top-vms .bars"), topVms.top.map((r) => ({ label: r.name, value: r.bytes })));
      VChart.hbars($("#top-pairs .bars"),
        topPairs.top.map((r) => ({ label: `${r.a} ↔ ${r.b}`, value: r.bytes })));
      fillWhatifForm(hosts.hosts, vms.vms);
      await Promise.all([drawVm(vms.vms), drawCollectors(), drawViolations(), drawForecast()]);
      polls += 1;
      status.dataset.polls = String(polls);
      status.className = "";
      status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      status.className = "error";
      status.textContent = String(err.message || err);
    } finally {
      busy = false;
    }
  }

  $("#pcap-link").addEventListener("click", async (event) => {
    if (!token) return;  // without a token the plain link downloads
    event.preventDefault();
    const response = await fetch(event.currentTarget.href,
      { headers: { Authorization: `Bearer ${token}` } });
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = event.currentTarget.getAttribute("download") || "vspan.pcapng";
    a.click();
    URL.revokeObjectURL(url);
  });
  for (const id of ["#window", "#bin", "#vm-select", "#fc-pair"]) {
    $(id).addEventListener("change", refresh);
  }
  $("#whatif").addEventListener("submit", (event) => {
    whatIf(event).catch((err) => { $("#wi-note").textContent = String(err.message || err); });
  });
  refresh();
  setInterval(refresh, POLL_MS);
})();
