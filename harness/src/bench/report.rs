//! The benchmark's outputs: the table on stdout, the JSON file and the SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::{BenchError, BenchReport, ConfigResult, Result};

const MIB: f64 = 1024.0 * 1024.0;

fn max_of(v: &[u64]) -> u64 {
    v.iter().copied().max().unwrap_or(0)
}

fn fmax(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// The communication ratio column: the range over ranks.
fn ratio_text(r: &ConfigResult) -> String {
    if r.comm_ratio.iter().any(Option::is_none) {
        return "n/a".into();
    }
    let v: Vec<f64> = r.comm_ratio.iter().flatten().copied().collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = fmax(&v);
    if (hi - lo).abs() < 5e-3 { format!("{hi:.2}") } else { format!("{lo:.2}–{hi:.2}") }
}

fn quality_text(r: &ConfigResult) -> (String, String) {
    let psnr = match (r.psnr_db, r.max_abs_error) {
        (Some(p), _) => format!("{p:.1}"),
        (None, Some(0.0)) => "exact".into(),
        _ => "-".into(),
    };
    let err = match r.max_abs_error {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(e) => format!("{e:.1e}"),
    };
    (psnr, err)
}

/// One line per configuration, as it ends (for progress on stderr).
pub fn line(r: &ConfigResult) -> String {
    match &r.error {
        Some(e) => format!("{} n={} {}px: not run: {e}", r.label, r.world_size, r.resolution),
        None => format!(
            "{} n={} t={} {}px: {:.1} ms/step, {:.2} s/image{}, comm ratio {}, others' load {:.2} cores",
            r.label,
            r.world_size,
            r.threads_per_rank,
            r.resolution,
            r.latency_per_step_ms,
            r.latency_per_image_s,
            match (r.speedup, r.steady_speedup) {
                (Some(s), Some(t)) => format!(", speed-up {s:.2}× (steady steps {t:.2}×)"),
                _ => String::new(),
            },
            ratio_text(r),
            r.other_load_cores
        ),
    }
}

/// The table printed on stdout: a header with the CPU (its model and SIMD flags) and the
/// model, then a line per configuration.
pub fn table(report: &BenchReport) -> String {
    let m = &report.model;
    let mut out = String::new();
    let simd = &report.machine.simd_flags;
    let _ = writeln!(
        out,
        "cpu {}; SIMD {}",
        report.machine.cpu,
        if simd.is_empty() { "unknown".to_string() } else { simd.join(" ") }
    );
    let _ = writeln!(
        out,
        "model {} ({}, {} layers, hidden {}, {} heads, {:.0} M parameters{}); {} cores; median of \
         {} after {} warm-up; guidance batch, {} text tokens; denoiser in {}",
        m.name,
        m.class_name,
        m.layers,
        m.hidden_size,
        m.heads,
        m.params as f64 / 1e6,
        if m.random_weights { ", random weights" } else { "" },
        report.cores,
        report.repetitions,
        report.warmup_runs,
        report.text_tokens,
        report.dtype,
    );
    let links: std::collections::BTreeSet<&str> =
        report.results.iter().filter_map(|r| r.link.as_deref()).collect();
    if !links.is_empty() {
        let _ = writeln!(
            out,
            "links (transfers take (latency + bytes / bandwidth) × dilation): {}",
            links.into_iter().collect::<Vec<_>>().join("; ")
        );
    }
    let w = report.results.iter().map(|r| r.label.chars().count()).max().unwrap_or(8).max(8);
    let _ = writeln!(
        out,
        "{:<w$} {:>3} {:>3} {:>5} {:>10} {:>9} {:>8} {:>10} {:>8} {:>8} {:>7} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9} {:>7} {:>8} {:>6}",
        "strategy",
        "N",
        "thr",
        "px",
        "ms/step",
        "s/image",
        "speedup",
        "steady ms",
        "steady×",
        "wait ms",
        "per-core",
        "param MiB",
        "buffer MiB",
        "peak MiB",
        "comm MiB",
        "formula",
        "ratio",
        "PSNR dB",
        "max err",
        "others",
    );
    for r in &report.results {
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "{:<w$} {:>3} {:>3} {:>5} not run: {e}",
                r.label, r.world_size, r.threads_per_rank, r.resolution
            );
            continue;
        }
        let (psnr, err) = quality_text(r);
        let _ = writeln!(
            out,
            "{:<w$} {:>3} {:>3} {:>5} {:>10.1} {:>9.2} {:>8} {:>10.1} {:>8} {:>8.1} {:>7} {:>10.1} {:>10.1} {:>9.0} {:>10.2} {:>10.2} {:>9} {:>7} {:>8} {:>6.2}",
            r.label,
            r.world_size,
            r.threads_per_rank,
            r.resolution,
            r.latency_per_step_ms,
            r.latency_per_image_s,
            r.speedup.map_or("-".into(), |s| format!("{s:.2}×")),
            r.steady_step_ms,
            r.steady_speedup.map_or("-".into(), |s| format!("{s:.2}×")),
            fmax(&r.wait_ms_per_step),
            r.speedup_per_core.map_or("-".into(), |s| format!("{s:.2}")),
            max_of(&r.param_bytes) as f64 / MIB,
            max_of(&r.buffer_bytes) as f64 / MIB,
            r.peak_rss_bytes as f64 / MIB,
            fmax(&r.comm_bytes_per_step) / MIB,
            fmax(&r.comm_formula_bytes_per_step) / MIB,
            ratio_text(r),
            psnr,
            err,
            r.other_load_cores,
        );
    }
    let _ = write!(
        out,
        "ms/step, s/image: median request of the slowest rank / steps; speedup: serial (1 rank, \
         1 thread) over this; steady: the median step after the strategy's warmup steps and \
         before the last, and serial's over it; wait ms: time per step the most-waiting rank \
         spent blocked on communication (the rest of its step is compute); per-core: speedup / \
         cores used; param/buffer MiB: the largest \
         rank; peak MiB: process VmHWM during the configuration (all ranks); comm MiB: sent per \
         step by the busiest rank, measured and by formula; others: cores used by other \
         processes meanwhile"
    );
    out
}

/// Writes the report as pretty JSON (creating the folder).
pub fn write_json(report: &BenchReport, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(report).expect("a report serializes");
    std::fs::write(path, text).map_err(|e| BenchError::io(path, e))
}

/// The lines of a chart: per strategy label and resolution, `(world size, value)` points
/// in world-size order.
fn series(
    report: &BenchReport,
    value: impl Fn(&ConfigResult) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let resolutions: std::collections::BTreeSet<usize> =
        report.results.iter().map(|r| r.resolution).collect();
    let several = resolutions.len() > 1;
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let serial: Vec<&ConfigResult> = report
        .results
        .iter()
        .filter(|r| r.strategy == "serial" && r.world_size == 1 && r.error.is_none())
        .collect();
    for r in report.results.iter().filter(|r| r.error.is_none() && r.strategy != "serial") {
        let name =
            if several { format!("{} {}px", r.label, r.resolution) } else { r.label.clone() };
        let Some(v) = value(r) else { continue };
        let entry = match out.iter_mut().position(|(n, _)| *n == name) {
            Some(i) => &mut out[i].1,
            None => {
                // Every line starts at the one-rank serial baseline.
                let start: Vec<(f64, f64)> = serial
                    .iter()
                    .filter(|s| s.resolution == r.resolution && s.speedup == Some(1.0))
                    .filter_map(|s| value(s).map(|v| (1.0, v)))
                    .collect();
                out.push((name, start));
                &mut out.last_mut().expect("pushed").1
            }
        };
        entry.push((r.world_size as f64, v));
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Draws latency per step (left) and speed-up over serial (right) against the world size,
/// one line per strategy (and resolution), as an SVG file.
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let chart_err = |e: &dyn std::fmt::Display| BenchError::Chart(e.to_string());
    let latency = series(report, |r| Some(r.latency_per_step_ms));
    let speedup = series(report, |r| r.speedup);
    let max_n = report.results.iter().map(|r| r.world_size).max().unwrap_or(1).max(2) as f64;
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_err(&e))?;
    let title = format!(
        "{} ({} layers) on {} cores: latency and speed-up per strategy",
        report.model.name, report.model.layers, report.cores
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(|e| chart_err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let panels = [
        (left, &latency, "latency per step (ms)", false),
        (right, &speedup, "speed-up over serial (1 rank, 1 thread)", true),
    ];
    for (area, lines, caption, ideal) in panels {
        let top = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(0.0, f64::max);
        let top = if ideal { top.max(max_n) } else { top } * 1.15 + 1e-9;
        let mut chart = ChartBuilder::on(&area)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.8..max_n + 0.2, 0.0..top)
            .map_err(|e| chart_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("world size (ranks)")
            .x_labels(max_n as usize + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| chart_err(&e))?;
        if ideal {
            chart
                .draw_series(LineSeries::new([(1.0, 1.0), (max_n, max_n)], BLACK.mix(0.3)))
                .map_err(|e| chart_err(&e))?
                .label("ideal (N×)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.3)));
        }
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| chart_err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| chart_err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(if ideal {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::UpperRight
            })
            .draw()
            .map_err(|e| chart_err(&e))?;
    }
    root.present().map_err(|e| chart_err(&e))?;
    Ok(())
}
