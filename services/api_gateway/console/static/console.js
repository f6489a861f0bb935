// The console's only script (no inline scripts: the pages' CSP allows 'self' only). Two jobs:
// - a job page's curves: poll its small JSON endpoint and redraw two uPlot charts until the job ends;
// - the playground: stream a completion over fetch + ReadableStream (the same SSE as POST /v1/completions),
//   showing the text as it arrives, time to first token and tokens/s.
(function () {
  "use strict";

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // --- job curves -----------------------------------------------------------------------------------------------
  function makeChart(el, label, color) {
    const opts = {
      width: Math.max(320, el.clientWidth || 560), height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { size: 60 }],
      series: [{ label: "step" }, { label: label, stroke: color, width: 2, points: { show: true, size: 4 } }],
    };
    return new uPlot(opts, [[], []], el);
  }

  function startCurves(section) {
    const charts = [
      [makeChart(document.getElementById("loss-chart"), "loss", "#2563eb"), "loss"],
      [makeChart(document.getElementById("bpb-chart"), "bits/byte", "#dc2626"), "val_bpb"],
    ];
    const pollMs = Number(section.dataset.pollMs) || 3000;
    async function tick() {
      let done = false;
      try {
        const response = await fetch(section.dataset.url, { credentials: "same-origin", cache: "no-store" });
        if (response.ok) {
          const curves = await response.json();
          for (const [chart, key] of charts) chart.setData([curves[key].steps, curves[key].values]);
          // Read by the browser test (and handy in devtools): how many points each curve has now.
          section.dataset.lossPoints = String(curves.loss.steps.length);
          section.dataset.bpbPoints = String(curves.val_bpb.steps.length);
          section.dataset.status = curves.status;
          done = curves.done;
        } else if (response.status === 401 || response.status === 404) {
          done = true;
        }
      } catch (err) {
        // the gateway restarting: try again at the next tick
      }
      if (!done) setTimeout(tick, pollMs);
    }
    window.addEventListener("resize", function () {
      for (const [chart] of charts) chart.setSize({ width: Math.max(320, chart.root.parentNode.clientWidth), height: 260 });
    });
    tick();
  }

  // --- playground -----------------------------------------------------------------------------------------------
  function startPlayground(form) {
    const output = document.getElementById("pg-output");
    const stats = document.getElementById("pg-stats");
    const run = document.getElementById("pg-run");
    const stop = document.getElementById("pg-stop");
    let controller = null;

    stop.addEventListener("click", function () { if (controller) controller.abort(); });

    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      controller = new AbortController();
      run.disabled = true;
      stop.disabled = false;
      delete output.dataset.done;
      const prompt = document.getElementById("pg-prompt").value;
      output.textContent = "";
      const promptSpan = document.createElement("span");
      promptSpan.className = "prompt";
      promptSpan.textContent = prompt;
      const generated = document.createElement("span");
      generated.className = "generated";
      output.append(promptSpan, generated);
      stats.textContent = "waiting for the first token…";

      const started = performance.now();
      let first = null;
      let pieces = 0;
      let usage = null;
      function showStats(final) {
        const tokens = usage ? usage.completion_tokens : pieces;
        const now = performance.now();
        const decodeSeconds = first === null ? 0 : (now - first) / 1000;
        const rate = decodeSeconds > 0 ? (Math.max(tokens - 1, 0) / decodeSeconds) : 0;
        let text = tokens + " tokens";
        if (first !== null) text += " · first token " + Math.round(first - started) + " ms";
        if (rate > 0) text += " · " + rate.toFixed(1) + " tokens/s";
        stats.textContent = text + (final ? " · done" : "");
        stats.dataset.tokensPerSecond = rate.toFixed(1);
      }
      try {
        const response = await fetch(form.dataset.url, {
          method: "POST", credentials: "same-origin", signal: controller.signal,
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
          body: JSON.stringify({
            model: document.getElementById("pg-model").value, prompt: prompt, stream: true,
            stream_options: { include_usage: true },
            max_tokens: Number(document.getElementById("pg-max-tokens").value) || 128,
            temperature: Number(document.getElementById("pg-temperature").value),
          }),
        });
        if (!response.ok) {
          let message = response.statusText;
          try { message = (await response.json()).error.message; } catch (err) { /* not JSON */ }
          stats.textContent = "Error " + response.status + ": " + message;
          return;
        }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            for (const line of block.split("\n")) {
              if (!line.startsWith("data:")) continue;  // ": keep-alive" comments
              const data = line.slice(5).trim();
              if (data === "[DONE]") continue;
              const chunk = JSON.parse(data);
              if (chunk.error) { stats.textContent = "Error: " + chunk.error.message; continue; }
              if (chunk.usage) usage = chunk.usage;
              for (const choice of chunk.choices || []) {
                if (!choice.text) continue;
                if (first === null) first = performance.now();
                generated.textContent += choice.text;
                pieces += 1;
              }
              showStats(false);
            }
          }
        }
        showStats(true);
      } catch (err) {
        stats.textContent = err.name === "AbortError" ? "stopped" : "Error: " + err.message;
      } finally {
        output.dataset.done = "1";
        run.disabled = false;
        stop.disabled = true;
        controller = null;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const curves = document.getElementById("curves");
    if (curves) startCurves(curves);
    const playground = document.getElementById("playground");
    if (playground) startPlayground(playground);
  });
})();
