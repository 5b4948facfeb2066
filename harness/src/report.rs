//! The comparison reports: HTML pages a person looks at (`eval strategies --report DIR`,
//! `bench --report DIR`).
//!
//! `DIR/index.html` is self-contained apart from the images beside it (`DIR/img/…`): the
//! table (speed, PSNR/SSIM against serial, FID where measured), bar charts of seconds per
//! image and speed-up (inline SVG), and for every prompt the serial image beside every
//! strategy's, each with its difference heat-map `|image − serial|` (largest channel
//! difference, amplified ×[`HEAT_GAIN`], colour scale drawn under the grid).
//!
//! The benchmark's page has the machine and model, the full table, the latency and speed-up
//! chart per world size, and bar charts of memory per rank and of the bytes each
//! configuration sent per step against its formula.
//!
//! A small inline script marks the page once every image has loaded (`<body
//! data-images="loaded/total" data-errors="n">`), so a headless browser can check it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::eval::StrategyRow;
use crate::{HarnessError, Result};

/// Amplification of the heat-maps: a difference of `255 / HEAT_GAIN` levels is full scale.
pub const HEAT_GAIN: f64 = 4.0;
/// Prompts shown as image rows (the table covers every image).
pub const MAX_PROMPT_ROWS: usize = 8;

/// One generated image as the batch's `metadata.jsonl` lists it.
#[derive(Debug, Clone)]
struct Item {
    file: String,
    prompt: String,
    seed: u64,
}

fn read_items(dir: &Path) -> Result<Vec<Item>> {
    let path = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| HarnessError::io(&path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| HarnessError::config(path.display().to_string(), e.to_string()))?;
            Ok(Item {
                file: v["file"].as_str().unwrap_or_default().to_string(),
                prompt: v["prompt"].as_str().unwrap_or_default().to_string(),
                seed: v["seed"].as_u64().unwrap_or_default(),
            })
        })
        .collect()
}

/// The "hot" colour scale: black → red → yellow → white, for `t ∈ [0, 1]`.
fn hot(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let c = |x: f64| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(t * 3.0), c(t * 3.0 - 1.0), c(t * 3.0 - 2.0)]
}

/// Writes the heat-map of `|b − a|` (largest channel difference, ×[`HEAT_GAIN`]).
fn heat_map(a: &Path, b: &Path, out: &Path) -> Result<()> {
    let (pa, (h, w)) = quality::load_rgb8(a)?;
    let (pb, dims) = quality::load_rgb8(b)?;
    if dims != (h, w) {
        return Err(HarnessError::config(
            b.display().to_string(),
            "not the size of serial's image",
        ));
    }
    let pixels: Vec<u8> = pa
        .chunks(3)
        .zip(pb.chunks(3))
        .flat_map(|(x, y)| {
            let d = (0..3).map(|c| x[c].abs_diff(y[c])).max().unwrap_or(0);
            hot(f64::from(d) * HEAT_GAIN / 255.0)
        })
        .collect();
    let img = image::RgbImage::from_raw(w as u32, h as u32, pixels).expect("h·w·3 bytes");
    img.save(out).map_err(|e| HarnessError::io(out, e))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar chart (inline SVG) of `values` labelled by `labels`.
fn bar_chart(title: &str, unit: &str, labels: &[String], values: &[f64]) -> String {
    let (bar_h, gap, left, width) = (22.0, 8.0, 260.0, 300.0);
    let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-12);
    let height = 34.0 + labels.len() as f64 * (bar_h + gap);
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"{t}\" width=\"{w}\" height=\"{height}\" \
         viewBox=\"0 0 {w} {height}\"><text x=\"0\" y=\"16\" class=\"ct\">{t}</text>",
        t = esc(title),
        w = left + width + 90.0,
    );
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let y = 28.0 + i as f64 * (bar_h + gap);
        let len = if v.is_finite() { v / max * width } else { 0.0 };
        let _ = write!(
            s,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\" class=\"cl\">{l}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{len:.1}\" height=\"{bar_h}\" rx=\"3\" \
             class=\"bar{serial}\"/><text x=\"{vx:.1}\" y=\"{ty}\" class=\"cv\">{v:.2}{unit}</text>",
            lx = left - 8.0,
            ty = y + 15.0,
            l = esc(l),
            serial = if l == "serial" { " serial" } else { "" },
            vx = left + len + 6.0,
        );
    }
    s + "</svg>"
}

/// The colour scale of the heat-maps (inline SVG).
fn heat_legend() -> String {
    let stops: String = (0..=10)
        .map(|i| {
            let [r, g, b] = hot(f64::from(i) / 10.0);
            format!("<stop offset=\"{}%\" stop-color=\"rgb({r},{g},{b})\"/>", i * 10)
        })
        .collect();
    let full = 255.0 / HEAT_GAIN;
    format!(
        "<svg class=\"legend\" width=\"340\" height=\"46\" viewBox=\"0 0 340 46\" role=\"img\" \
         aria-label=\"heat-map scale\"><defs><linearGradient id=\"hot\">{stops}</linearGradient>\
         </defs><rect x=\"10\" y=\"4\" width=\"320\" height=\"16\" fill=\"url(#hot)\" \
         stroke=\"#999\"/><text x=\"10\" y=\"38\" class=\"cl\">0</text><text x=\"170\" y=\"38\" \
         text-anchor=\"middle\" class=\"cl\">{:.0}</text><text x=\"330\" y=\"38\" \
         text-anchor=\"end\" class=\"cl\">≥ {full:.0} levels of 255</text></svg>",
        full / 2.0
    )
}

/// A bar chart of two values per label (`a` dark, `b` light), e.g. measured against formula.
fn pair_chart(
    title: &str,
    unit: &str,
    labels: &[String],
    a: &[f64],
    b: &[f64],
    names: [&str; 2],
) -> String {
    let (bar_h, gap, left, width) = (11.0, 10.0, 260.0, 300.0);
    let max =
        a.iter().chain(b).copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-12);
    let height = 52.0 + labels.len() as f64 * (2.0 * bar_h + gap);
    let w = left + width + 110.0;
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"{t}\" width=\"{w}\" height=\"{height}\" \
         viewBox=\"0 0 {w} {height}\"><text x=\"0\" y=\"16\" class=\"ct\">{t}</text>\
         <rect x=\"{left}\" y=\"24\" width=\"10\" height=\"10\" class=\"bar\"/><text x=\"{l1}\" \
         y=\"33\" class=\"cl\">{n0}</text><rect x=\"{l2}\" y=\"24\" width=\"10\" height=\"10\" \
         class=\"bar two\"/><text x=\"{l3}\" y=\"33\" class=\"cl\">{n1}</text>",
        t = esc(title),
        l1 = left + 14.0,
        l2 = left + 200.0,
        l3 = left + 214.0,
        n0 = esc(names[0]),
        n1 = esc(names[1]),
    );
    for (i, l) in labels.iter().enumerate() {
        let y = 44.0 + i as f64 * (2.0 * bar_h + gap);
        let _ = write!(
            s,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\" class=\"cl\">{l}</text>",
            lx = left - 8.0,
            ty = y + 15.0,
            l = esc(l)
        );
        for (k, (v, class)) in [(a[i], "bar"), (b[i], "bar two")].into_iter().enumerate() {
            let yy = y + k as f64 * bar_h;
            let len = if v.is_finite() { v / max * width } else { 0.0 };
            let _ = write!(
                s,
                "<rect x=\"{left}\" y=\"{yy}\" width=\"{len:.1}\" height=\"{h}\" class=\"{class}\"/>\
                 <text x=\"{vx:.1}\" y=\"{ty:.1}\" class=\"cv\">{}</text>",
                human(v, unit),
                h = bar_h - 1.0,
                vx = left + len + 6.0,
                ty = yy + 9.0,
            );
        }
    }
    s + "</svg>"
}

/// `1.5e7` bytes → `15.0 MB`.
fn human(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let (d, p) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(d, _)| v.abs() >= *d)
        .unwrap_or((1.0, ""));
    format!("{:.1} {p}{unit}", v / d)
}

/// Writes `dir/index.html` (and `dir/chart.svg`, inlined) for a benchmark; returns the
/// page's path.
///
/// # Errors
/// The chart or the page cannot be written.
pub fn write_bench_report(dir: &Path, report: &crate::bench::BenchReport) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(dir, e))?;
    let chart = dir.join("chart.svg");
    crate::bench::report::write_svg(report, &chart)?;
    let svg = std::fs::read_to_string(&chart).map_err(|e| HarnessError::io(&chart, e))?;
    let m = &report.model;
    let title = format!("{} ({} layers): strategies side by side", m.name, m.layers);
    let mut html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>{STYLE}</style></head><body data-images=\"0/0\" data-errors=\"0\"><h1>{t}</h1>\
         <p class=\"sub\">{} ({} parameters{}), on {} ({} cores used; SIMD: {}); {} timed \
         request(s) per configuration after {} untimed; guidance scale {}; seed {}.</p>",
        esc(&m.class_name),
        human(m.params as f64, ""),
        if m.random_weights { ", random weights" } else { "" },
        esc(&report.machine.cpu),
        report.cores,
        esc(&report.machine.simd_flags.join(" ")),
        report.repetitions,
        report.warmup_runs,
        report.guidance_scale,
        report.seed,
        t = esc(&title),
    );
    html += "<h2>Results</h2><table><tr><th>configuration</th><th>ranks × threads</th><th>px</th>\
             <th>latency / image (s)</th><th>ms / step</th><th>speed-up</th><th>steady speed-up</th>\
             <th>peak RSS</th><th>params / rank</th><th>sent / step (rank 0)</th><th>measured ÷ \
             formula</th><th>PSNR vs serial</th></tr>";
    let ok: Vec<&crate::bench::ConfigResult> =
        report.results.iter().filter(|r| r.error.is_none()).collect();
    let opt = |x: Option<f64>, suffix: &str| x.map_or("–".into(), |v| format!("{v:.2}{suffix}"));
    for r in &report.results {
        if let Some(e) = &r.error {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td colspan=\"9\">did not run: {}</td></tr>",
                esc(&r.label),
                r.world_size,
                r.resolution,
                esc(e)
            );
            continue;
        }
        let ratio = r.comm_ratio.first().copied().flatten();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{} × {}</td><td>{}</td><td>{:.3}</td><td>{:.1}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.label),
            r.world_size,
            r.threads_per_rank,
            r.resolution,
            r.latency_per_image_s,
            r.latency_per_step_ms,
            opt(r.speedup, "×"),
            opt(r.steady_speedup, "×"),
            human(r.peak_rss_bytes as f64, "B"),
            human(r.param_bytes.iter().copied().max().unwrap_or(0) as f64, "B"),
            human(r.comm_bytes_per_step.first().copied().unwrap_or(0.0), "B"),
            opt(ratio, ""),
            r.psnr_db.map_or("∞".into(), |p| format!("{p:.1} dB")),
        );
    }
    html += "</table><h2>Latency and speed-up per world size</h2><div class=\"inline-svg\">";
    // The chart file without its XML declaration.
    html += svg.find("<svg").map_or("", |at| svg[at..].trim_end());
    html += "</div><h2>Memory and communication</h2><div class=\"charts\">";
    let labels: Vec<String> =
        ok.iter().map(|r| format!("{} n={} {}px", r.label, r.world_size, r.resolution)).collect();
    let max_of = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    let params: Vec<f64> = ok.iter().map(|r| max_of(&r.param_bytes)).collect();
    let buffers: Vec<f64> = ok.iter().map(|r| max_of(&r.buffer_bytes)).collect();
    html += &pair_chart(
        "memory per rank (largest rank)",
        "B",
        &labels,
        &params,
        &buffers,
        ["parameters", "strategy buffers"],
    );
    let sent: Vec<f64> =
        ok.iter().map(|r| r.comm_bytes_per_step.iter().copied().fold(0.0, f64::max)).collect();
    let formula: Vec<f64> = ok
        .iter()
        .map(|r| r.comm_formula_bytes_per_step.iter().copied().fold(0.0, f64::max))
        .collect();
    html += &pair_chart(
        "bytes sent per step (busiest rank)",
        "B",
        &labels,
        &sent,
        &formula,
        ["measured by the transport", "formula (expected_comm)"],
    );
    html += "</div></body></html>\n";
    let page = dir.join("index.html");
    std::fs::write(&page, html).map_err(|e| HarnessError::io(&page, e))?;
    Ok(page)
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}.sub{color:#666;margin:0 0 16px}\
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #e3e3e3;text-align:right}\
th:first-child,td:first-child{text-align:left}th{background:#f5f5f5}tr.serial td{color:#555}\
.charts{display:flex;flex-wrap:wrap;gap:24px}.ct{font-weight:600;font-size:13px}.cl,.cv{font-size:12px;fill:#333}\
.bar{fill:#4a7bd0}.bar.serial{fill:#9aa5b1}.bar.two{fill:#a9c2ee}.inline-svg svg{max-width:100%;height:auto}.grid{display:grid;gap:10px;align-items:start}\
.cell{text-align:center;font-size:12px}.cell img{width:100%;image-rendering:pixelated;border:1px solid #ccc;display:block}\
.cell .heat{margin-top:3px}.prompt{font-weight:600;margin:18px 0 6px}.head{font-weight:600;font-size:12px;text-align:center}";

/// Writes `dir/index.html` and its images for an `eval strategies` run whose images are in
/// `out` (`out/serial`, `out/<label dir>`); returns the page's path.
///
/// # Errors
/// Images or metadata that cannot be read, a page that cannot be written.
pub fn write_eval_report(
    dir: &Path,
    out: &Path,
    rows: &[StrategyRow],
    title: &str,
) -> Result<PathBuf> {
    let img = dir.join("img");
    std::fs::create_dir_all(&img).map_err(|e| HarnessError::io(&img, e))?;
    let items = read_items(&out.join("serial"))?;
    let serial_time = rows.first().map_or(f64::NAN, |r| r.seconds_per_image);
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let mut html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>{STYLE}</style></head><body data-images=\"0/0\" data-errors=\"0\"><h1>{t}</h1>\
         <p class=\"sub\">{} images per strategy; PSNR and SSIM against serial's image of the same \
         prompt and seed; heat-maps show |image − serial| ×{HEAT_GAIN:.0}.</p>",
        items.len(),
        t = esc(title),
    );
    // The table.
    html += "<h2>Summary</h2><table><tr><th>strategy</th><th>ranks</th><th>s / image</th>\
             <th>speed-up</th><th>PSNR mean (dB)</th><th>PSNR worst</th><th>SSIM mean</th>\
             <th>SSIM worst</th><th>FID vs serial</th><th>FID vs reference</th>\
             <th>shapes as named</th></tr>";
    let db = |x: f64| if x.is_finite() { format!("{x:.2}") } else { "∞".into() };
    let opt = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.3}"));
    for (i, r) in rows.iter().enumerate() {
        let c = &r.vs_serial;
        let _ = write!(
            html,
            "<tr{}><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}×</td><td>{}</td><td>{}</td>\
             <td>{:.4}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if i == 0 { " class=\"serial\"" } else { "" },
            esc(&r.label),
            r.world_size,
            r.seconds_per_image,
            serial_time / r.seconds_per_image,
            c.mean_psnr.map_or("∞".into(), db),
            db(c.worst_psnr),
            c.mean_ssim,
            c.worst_ssim,
            opt(r.fid_vs_serial),
            opt(r.fid_vs_reference),
            crate::eval::fmt_agreement(r.shapes_agree),
        );
    }
    html += "</table><h2>Speed</h2><div class=\"charts\">";
    let secs: Vec<f64> = rows.iter().map(|r| r.seconds_per_image).collect();
    let speed: Vec<f64> = secs.iter().map(|s| serial_time / s).collect();
    html += &bar_chart("seconds per image", " s", &labels, &secs);
    html += &bar_chart("speed-up over serial", "×", &labels, &speed);
    let psnr: Vec<f64> =
        rows.iter().skip(1).map(|r| r.vs_serial.mean_psnr.unwrap_or(f64::INFINITY)).collect();
    html += &bar_chart("mean PSNR against serial", " dB", &labels[1..], &psnr);
    html += "</div><h2>Images</h2>";
    html += &heat_legend();
    let cols = rows.len();
    for item in items.iter().take(MAX_PROMPT_ROWS) {
        let _ = write!(
            html,
            "<div class=\"prompt\">“{}” (seed {})</div><div class=\"grid\" \
             style=\"grid-template-columns:repeat({cols},minmax(110px,190px))\">",
            esc(&item.prompt),
            item.seed
        );
        for (i, r) in rows.iter().enumerate() {
            let sub = crate::eval::label_dir(&r.label);
            let src = out.join(&sub).join(&item.file);
            let dst_dir = img.join(&sub);
            std::fs::create_dir_all(&dst_dir).map_err(|e| HarnessError::io(&dst_dir, e))?;
            std::fs::copy(&src, dst_dir.join(&item.file)).map_err(|e| HarnessError::io(&src, e))?;
            let pair = r.vs_serial.pairs.iter().find(|p| p.file == item.file);
            let _ = write!(
                html,
                "<div class=\"cell\"><div class=\"head\">{}</div><img src=\"img/{sub}/{f}\" \
                 alt=\"{} — {}\">",
                esc(&r.label),
                esc(&r.label),
                esc(&item.prompt),
                f = item.file,
            );
            if i > 0 {
                let heat = format!("diff-{}", item.file);
                heat_map(&out.join("serial").join(&item.file), &src, &dst_dir.join(&heat))?;
                let _ = write!(
                    html,
                    "<img class=\"heat\" src=\"img/{sub}/{heat}\" alt=\"difference from serial\">\
                     PSNR {} dB · SSIM {:.4}",
                    pair.map_or("–".into(), |p| db(p.psnr)),
                    pair.map_or(f64::NAN, |p| p.ssim),
                );
            } else {
                html += "serial (the reference)";
            }
            html += "</div>";
        }
        html += "</div>";
    }
    html += "<script>(function(){var imgs=[].slice.call(document.images),n=0,bad=0;\
             function done(){document.body.dataset.images=n+'/'+imgs.length;}\
             window.addEventListener('error',function(){document.body.dataset.errors=\
             String(+document.body.dataset.errors+1);},true);\
             imgs.forEach(function(im){function ok(){if(im.naturalWidth>0){n++;}else{bad++;}done();}\
             if(im.complete){ok();}else{im.addEventListener('load',ok);im.addEventListener('error',\
             function(){bad++;document.body.dataset.errors=String(+document.body.dataset.errors+1);\
             done();});}});done();})();</script></body></html>\n";
    let page = dir.join("index.html");
    std::fs::write(&page, html).map_err(|e| HarnessError::io(&page, e))?;
    Ok(page)
}
