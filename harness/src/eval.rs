//! `harness eval`: image-quality measures over folders of images.
//!
//! - `eval fid A [B] --inception W [--save-stats OUT.npz]`: the FID between two image folders
//!   or pytorch-fid `.npz` statistics, as pytorch-fid computes it (crate `quality`); with
//!   `--save-stats` the statistics of folder `A` are written in pytorch-fid's format.
//! - `eval compare REFERENCE GENERATED`: per image pair, matched by file name, PSNR and SSIM
//!   (as scikit-image computes them, `metrics::image`); the mean and the worst pair.
//! - `eval strategies CONFIG --prompts FILE --strategies a,b,…`: the quality experiment in one
//!   command — the same prompts and seeds generated with serial and with each strategy
//!   (`OUT/serial/00000.png`, `OUT/<strategy>/…`, batch generation), then PSNR/SSIM against
//!   serial and, with `--inception`, FID against serial and against `--reference` (a folder
//!   of real images or its `.npz`); one row per strategy, also written to `OUT/eval.json`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use metrics::image::{ImageDims, psnr_u8, ssim_u8};
use quality::npz::{read_stats, write_stats};
use quality::{FidInception, Stats, frechet_distance, image_files, load_rgb8, stats_of_files};

use crate::{HarnessError, Result};

/// `harness eval …`.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// FID between two image folders or pytorch-fid `.npz` statistics (as pytorch-fid).
    Fid(FidArgs),
    /// PSNR and SSIM of every generated image against the reference of the same file name.
    Compare(CompareArgs),
    /// The same prompts with serial and each strategy: PSNR/SSIM against serial, FID.
    Strategies(Box<StrategiesArgs>),
}

/// `harness eval strategies`.
#[derive(Debug, Args)]
pub struct StrategiesArgs {
    /// A TOML run config: model, steps, guidance, scheduler, base seed (`configs/demo.toml`).
    pub config: PathBuf,
    /// Prompts, one per line or JSONL with `prompt`, `negative_prompt`, `seed` (as `harness
    /// run --prompts`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Images per prompt (seeds base + index).
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// The strategies to compare with serial, comma-separated; each `name` or
    /// `name:key=value:key=value` (e.g. `distrifusion:warmup_steps=1`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub strategies: Vec<String>,
    /// Ranks of every strategy but serial.
    #[arg(long, default_value_t = 2)]
    pub world_size: usize,
    /// Threads of each rank's pool (default: cores / world size).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Where every strategy's images go (`OUT/serial`, `OUT/<label>`) and `eval.json`.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// pytorch-fid's FID Inception weights (safetensors): adds FID columns.
    #[arg(long, value_name = "FILE.safetensors")]
    pub inception: Option<PathBuf>,
    /// Real images (a folder, or its pytorch-fid `.npz`) for FID against a reference.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// Also write the comparison page here (`DIR/index.html` and its images).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// One row of `eval strategies`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StrategyRow {
    /// The strategy and its options, as given.
    pub label: String,
    /// Ranks.
    pub world_size: usize,
    /// Wall seconds per image (the whole batch over its images).
    pub seconds_per_image: f64,
    /// PSNR/SSIM against serial's images of the same prompt and seed.
    pub vs_serial: Comparison,
    /// FID against serial's images (with `--inception`).
    pub fid_vs_serial: Option<f64>,
    /// FID against `--reference` (with `--inception` and `--reference`).
    pub fid_vs_reference: Option<f64>,
    /// Images that show the coloured shape their prompt names, and images whose prompt has
    /// the demo pipeline's form ("a red circle"; [`quality::shapes`]); `None` when none has.
    pub shapes_agree: Option<[usize; 2]>,
}

/// `harness eval fid`.
#[derive(Debug, Args)]
pub struct FidArgs {
    /// An image folder or a `.npz` of statistics (`mu`, `sigma`).
    pub a: PathBuf,
    /// The other folder or `.npz` (optional with `--save-stats`).
    pub b: Option<PathBuf>,
    /// pytorch-fid's FID Inception weights as safetensors (convert
    /// `pt_inception-2015-12-05-6726825d.pth` with tools/fid/convert_inception.py).
    #[arg(long, value_name = "FILE.safetensors")]
    pub inception: Option<PathBuf>,
    /// Write the statistics of folder A here (pytorch-fid's `.npz` format).
    #[arg(long, value_name = "FILE.npz")]
    pub save_stats: Option<PathBuf>,
    /// Images per Inception batch (pytorch-fid's default 50).
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
}

/// `harness eval compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The reference images (e.g. serial's).
    pub reference: PathBuf,
    /// The images to measure; each is paired with the reference of the same file name.
    pub generated: PathBuf,
    /// Also write every pair's numbers here as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    /// LPIPS (AlexNet) weights as safetensors (tools/fid/convert_lpips.py): adds LPIPS.
    #[arg(long, value_name = "FILE.safetensors")]
    pub lpips: Option<PathBuf>,
}

/// Runs `harness eval …`, printing its result.
///
/// # Errors
/// Bad paths, images that cannot be decoded or paired, weights that are not pytorch-fid's.
pub fn run_cli(cmd: &EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Fid(a) => {
            let out = fid(a)?;
            print!("{out}");
        }
        EvalCommand::Strategies(a) => {
            let rows = strategies(a)?;
            print!("{}", strategies_table(&rows));
            if let Some(dir) = &a.report {
                let title = format!("{} — strategies against serial", a.config.display());
                let page = crate::report::write_eval_report(dir, &a.output_dir, &rows, &title)?;
                println!("report: {}", page.display());
            }
        }
        EvalCommand::Compare(a) => {
            let lpips = match &a.lpips {
                Some(w) => {
                    Some(quality::Lpips::<burn_flex::Flex>::from_file(w, &Default::default())?)
                }
                None => None,
            };
            let c = compare_with(&a.reference, &a.generated, lpips.as_ref())?;
            if let Some(path) = &a.json {
                let text = serde_json::to_string_pretty(&c).expect("plain data serialises");
                std::fs::write(path, text + "\n").map_err(|e| HarnessError::io(path, e))?;
            }
            print!("{}", c.table());
        }
    }
    Ok(())
}

fn config(location: impl std::fmt::Display, reason: impl Into<String>) -> HarnessError {
    HarnessError::config(location.to_string(), reason)
}

/// The statistics of a folder (with the network) or of a `.npz`.
fn stats_of(
    path: &Path,
    net: &mut Option<FidInception<burn_flex::Flex>>,
    inception: Option<&Path>,
    batch: usize,
) -> Result<Stats> {
    if path.extension().and_then(|e| e.to_str()) == Some("npz") {
        return Ok(read_stats(path)?);
    }
    if !path.is_dir() {
        return Err(config(path.display(), "neither an image folder nor a .npz of statistics"));
    }
    if net.is_none() {
        let Some(w) = inception else {
            return Err(config(
                "--inception",
                format!(
                    "{} is an image folder: its features need --inception FILE.safetensors \
                     (pytorch-fid's weights, converted with tools/fid/convert_inception.py)",
                    path.display()
                ),
            ));
        };
        *net = Some(FidInception::from_file(w, &Default::default())?);
    }
    let net = net.as_ref().expect("loaded above");
    let files = image_files(path)?;
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images")
            .expect("a valid template"),
    );
    bar.set_message(format!("Inception features of {}", path.display()));
    let (_, stats) =
        stats_of_files(net, &files, batch, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok(stats)
}

/// `eval fid`: the text it prints.
///
/// # Errors
/// See [`run_cli`].
pub fn fid(a: &FidArgs) -> Result<String> {
    if a.b.is_none() && a.save_stats.is_none() {
        return Err(config(
            "eval fid",
            "needs a second folder or .npz to compare with, or --save-stats FILE.npz",
        ));
    }
    let mut net = None;
    let inception = a.inception.as_deref();
    let sa = stats_of(&a.a, &mut net, inception, a.batch_size)?;
    let mut out = String::new();
    if let Some(path) = &a.save_stats {
        write_stats(path, &sa)?;
        out += &format!("statistics of {} written to {}\n", a.a.display(), path.display());
    }
    if let Some(b) = &a.b {
        let sb = stats_of(b, &mut net, inception, a.batch_size)?;
        let d = frechet_distance(&sa, &sb)?;
        out += &format!("FID: {d:.6}\n");
    }
    Ok(out)
}

/// PSNR and SSIM of one image pair.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairScore {
    /// The shared file name.
    pub file: String,
    /// PSNR in dB (peak 255; infinite when equal, written as `null` in JSON).
    pub psnr: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// LPIPS (AlexNet), when its weights were given.
    pub lpips: Option<f64>,
}

/// Every pair of a comparison, with the mean and worst.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Per pair, in file-name order.
    pub pairs: Vec<PairScore>,
    /// Mean PSNR over the pairs whose images differ (`None` when all are equal).
    pub mean_psnr: Option<f64>,
    /// Lowest PSNR.
    pub worst_psnr: f64,
    /// Mean SSIM.
    pub mean_ssim: f64,
    /// Lowest SSIM.
    pub worst_ssim: f64,
    /// Mean LPIPS (with its weights).
    pub mean_lpips: Option<f64>,
    /// Highest LPIPS (with its weights).
    pub worst_lpips: Option<f64>,
}

impl Comparison {
    /// The printed table.
    pub fn table(&self) -> String {
        let lp = |x: Option<f64>| x.map_or(String::new(), |v| format!(" {v:>8.4}"));
        let mut s = format!(
            "{:<28} {:>10} {:>8}{}\n",
            "image",
            "PSNR (dB)",
            "SSIM",
            if self.mean_lpips.is_some() { "    LPIPS" } else { "" }
        );
        for p in &self.pairs {
            s += &format!("{:<28} {:>10} {:>8.4}{}\n", p.file, fmt_db(p.psnr), p.ssim, lp(p.lpips));
        }
        s += &format!(
            "{:<28} {:>10} {:>8.4}{}\n{:<28} {:>10} {:>8.4}{}\n",
            "mean",
            self.mean_psnr.map_or("inf".into(), fmt_db),
            self.mean_ssim,
            lp(self.mean_lpips),
            "worst",
            fmt_db(self.worst_psnr),
            self.worst_ssim,
            lp(self.worst_lpips),
        );
        s
    }
}

fn fmt_db(x: f64) -> String {
    if x.is_infinite() { "inf".into() } else { format!("{x:.2}") }
}

/// `eval compare`: every image of `generated` against the one of the same name in
/// `reference`.
///
/// # Errors
/// A folder without images, an image with no counterpart (named), images of different sizes.
pub fn compare(reference: &Path, generated: &Path) -> Result<Comparison> {
    compare_with(reference, generated, None)
}

/// [`compare`], with LPIPS too when `lpips` is given.
///
/// # Errors
/// As [`compare`].
pub fn compare_with(
    reference: &Path,
    generated: &Path,
    lpips: Option<&quality::Lpips<burn_flex::Flex>>,
) -> Result<Comparison> {
    let files = image_files(generated)?;
    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for g in &files {
        let name = g.file_name().expect("a file").to_string_lossy().into_owned();
        let r = reference.join(&name);
        if !r.is_file() {
            missing.push(name);
            continue;
        }
        let ((a, da), (b, db)) = (load_rgb8(&r)?, load_rgb8(g)?);
        if da != db {
            return Err(config(
                g.display(),
                format!(
                    "the reference {} is {}×{} but this image {}×{}",
                    r.display(),
                    da.0,
                    da.1,
                    db.0,
                    db.1
                ),
            ));
        }
        let ssim =
            ssim_u8(&a, &b, ImageDims::rgb(da.0, da.1)).map_err(|e| config(g.display(), e))?;
        let lpips = match lpips {
            Some(net) => Some(net.distance(&a, &b, da)?),
            None => None,
        };
        pairs.push(PairScore { file: name, psnr: psnr_u8(&a, &b), ssim, lpips });
    }
    if !missing.is_empty() {
        missing.truncate(5);
        return Err(config(
            reference.display(),
            format!("has no image named {} (pairs are matched by file name)", missing.join(", ")),
        ));
    }
    let finite: Vec<f64> = pairs.iter().map(|p| p.psnr).filter(|p| p.is_finite()).collect();
    let n = pairs.len() as f64;
    Ok(Comparison {
        mean_psnr: (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64),
        worst_psnr: pairs.iter().map(|p| p.psnr).fold(f64::INFINITY, f64::min),
        mean_ssim: pairs.iter().map(|p| p.ssim).sum::<f64>() / n,
        worst_ssim: pairs.iter().map(|p| p.ssim).fold(f64::INFINITY, f64::min),
        mean_lpips: lpips.map(|_| pairs.iter().filter_map(|p| p.lpips).sum::<f64>() / n),
        worst_lpips: lpips.map(|_| pairs.iter().filter_map(|p| p.lpips).fold(0.0, f64::max)),
        pairs,
    })
}

/// A file-name-safe label of a strategy spec (`distrifusion:warmup_steps=1` →
/// `distrifusion-warmup_steps=1`).
pub fn label_dir(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_=.-".contains(c) { c } else { '-' })
        .collect()
}

/// `eval strategies`: runs serial and every strategy on the same prompts and measures them.
///
/// # Errors
/// A bad config, prompt file or strategy spec (named), a failed run, images that cannot be
/// compared.
pub fn strategies(a: &StrategiesArgs) -> Result<Vec<StrategyRow>> {
    let base = crate::RunConfig::from_file(&a.config)?;
    std::fs::create_dir_all(&a.output_dir).map_err(|e| HarnessError::io(&a.output_dir, e))?;
    let mut specs = vec!["serial".to_string()];
    specs.extend(a.strategies.iter().filter(|s| s.as_str() != "serial").cloned());
    let mut net = None;
    let inception = a.inception.as_deref();
    let reference = match (&a.reference, inception) {
        (Some(r), Some(_)) => Some(stats_of(r, &mut net, inception, a.batch_size)?),
        (Some(_), None) => {
            return Err(config("--reference", "FID against a reference needs --inception"));
        }
        _ => None,
    };
    // Every run's settings first, each checked before any image is drawn.
    let mut runs = Vec::new();
    for spec in &specs {
        let mut parts = spec.split(':');
        let name = parts.next().unwrap_or_default();
        let mut cfg = base.clone();
        cfg.prompts = Some(a.prompts.clone());
        cfg.images_per_prompt = a.images_per_prompt;
        let dir = a.output_dir.join(label_dir(spec));
        cfg.output_dir = Some(dir.clone());
        cfg.parallel.strategy = name.to_string();
        cfg.parallel.world_size = if name == "serial" { 1 } else { a.world_size };
        cfg.parallel.options.clear();
        if a.threads_per_rank.is_some() {
            cfg.parallel.threads_per_rank = a.threads_per_rank;
        }
        for opt in parts {
            cfg.parallel
                .set_option(opt)
                .map_err(|e| config(format!("--strategies {spec}"), e.to_string()))?;
        }
        crate::RunPlan::new(&cfg)
            .map_err(|e| config(format!("--strategies {spec}"), e.to_string()))?;
        runs.push((spec, name, dir, cfg));
    }
    let mut rows = Vec::new();
    let mut serial_stats = None;
    for (spec, name, dir, cfg) in runs {
        eprintln!(
            "eval strategies: {spec} on {} ranks → {}",
            cfg.parallel.world_size,
            dir.display()
        );
        let report =
            crate::run_with_options(&cfg, &crate::RunOptions { decode: true, progress: false })?;
        let images = report.images.len().max(1);
        let serial_dir = a.output_dir.join("serial");
        let stats = if inception.is_some() {
            Some(stats_of(&dir, &mut net, inception, a.batch_size)?)
        } else {
            None
        };
        if name == "serial" {
            serial_stats = stats.clone();
        }
        let fid_vs = |other: &Option<Stats>| -> Result<Option<f64>> {
            match (&stats, other) {
                (Some(s), Some(o)) => Ok(Some(frechet_distance(s, o)?)),
                _ => Ok(None),
            }
        };
        rows.push(StrategyRow {
            label: spec.to_string(),
            world_size: report.world_size,
            seconds_per_image: report.total_time.as_secs_f64() / images as f64,
            vs_serial: compare(&serial_dir, &dir)?,
            fid_vs_serial: fid_vs(&serial_stats)?,
            fid_vs_reference: fid_vs(&reference)?,
            shapes_agree: shape_agreement(&dir)?,
        });
    }
    let json = a.output_dir.join("eval.json");
    let text = serde_json::to_string_pretty(&rows).expect("plain data serialises");
    std::fs::write(&json, text + "\n").map_err(|e| HarnessError::io(&json, e))?;
    Ok(rows)
}

/// How many of the images in a batch folder show the coloured shape their prompt names
/// (`metadata.jsonl`'s prompts of the demo's form; IoU ≥ [`quality::shapes::IOU_MIN`]), of
/// how many such prompts; `None` when no prompt has that form.
///
/// # Errors
/// The metadata or an image cannot be read.
pub fn shape_agreement(dir: &Path) -> Result<Option<[usize; 2]>> {
    let meta = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&meta).map_err(|e| HarnessError::io(&meta, e))?;
    let (mut agree, mut total) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| HarnessError::io(&meta, e))?;
        let (Some(prompt), Some(file)) = (v["prompt"].as_str(), v["file"].as_str()) else {
            continue;
        };
        let Some((colour, shape)) = quality::shapes::parse_caption(prompt) else { continue };
        let (rgb, (h, w)) = quality::load_rgb8(&dir.join(file))?;
        total += 1;
        let a = quality::shapes::agreement(&rgb, h, w);
        agree += usize::from(a.agrees(colour, shape, quality::shapes::IOU_MIN));
    }
    Ok((total > 0).then_some([agree, total]))
}

/// `agreeing/total`, or `–`.
pub fn fmt_agreement(a: Option<[usize; 2]>) -> String {
    a.map_or("–".into(), |[k, n]| format!("{k}/{n}"))
}

/// The table `eval strategies` prints.
pub fn strategies_table(rows: &[StrategyRow]) -> String {
    let opt = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.3}"));
    let mut s = format!(
        "{:<34} {:>5} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>7}\n",
        "strategy",
        "ranks",
        "s/image",
        "PSNR mean",
        "PSNR worst",
        "SSIM",
        "SSIM min",
        "FID serial",
        "FID ref",
        "shapes"
    );
    for r in rows {
        let c = &r.vs_serial;
        s += &format!(
            "{:<34} {:>5} {:>9.2} {:>10} {:>10} {:>8.4} {:>8.4} {:>10} {:>10} {:>7}\n",
            r.label,
            r.world_size,
            r.seconds_per_image,
            c.mean_psnr.map_or("inf".into(), fmt_db),
            fmt_db(c.worst_psnr),
            c.mean_ssim,
            c.worst_ssim,
            opt(r.fid_vs_serial),
            opt(r.fid_vs_reference),
            fmt_agreement(r.shapes_agree)
        );
    }
    s
}
