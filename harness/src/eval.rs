//! `harness eval`: image-quality measures over folders of images.
//!
//! - `eval fid A [B] --inception W [--save-stats OUT.npz]`: the FID between two image folders
//!   or pytorch-fid `.npz` statistics, as pytorch-fid computes it (crate `quality`); with
//!   `--save-stats` the statistics of folder `A` are written in pytorch-fid's format.
//! - `eval compare REFERENCE GENERATED`: per image pair, matched by file name, PSNR and SSIM
//!   (as scikit-image computes them, `metrics::image`); the mean and the worst pair.

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
        EvalCommand::Compare(a) => {
            let c = compare(&a.reference, &a.generated)?;
            if let Some(path) = &a.json {
                let text = serde_json::to_string_pretty(&c).expect("plain data serialises");
                std::fs::write(path, text + "\n").map_err(|e| io(path, e))?;
            }
            print!("{}", c.table());
        }
    }
    Ok(())
}

fn io(path: &Path, e: std::io::Error) -> HarnessError {
    HarnessError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

fn config(location: impl std::fmt::Display, reason: String) -> HarnessError {
    HarnessError::Config { location: location.to_string(), reason }
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
        return Err(config(
            path.display(),
            "neither an image folder nor a .npz of statistics".into(),
        ));
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
            "needs a second folder or .npz to compare with, or --save-stats FILE.npz".into(),
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
}

impl Comparison {
    /// The printed table.
    pub fn table(&self) -> String {
        let mut s = format!("{:<28} {:>10} {:>8}\n", "image", "PSNR (dB)", "SSIM");
        for p in &self.pairs {
            s += &format!("{:<28} {:>10} {:>8.4}\n", p.file, fmt_db(p.psnr), p.ssim);
        }
        s += &format!(
            "{:<28} {:>10} {:>8.4}\n{:<28} {:>10} {:>8.4}\n",
            "mean",
            self.mean_psnr.map_or("inf".into(), fmt_db),
            self.mean_ssim,
            "worst",
            fmt_db(self.worst_psnr),
            self.worst_ssim
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
        pairs.push(PairScore { file: name, psnr: psnr_u8(&a, &b), ssim });
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
        pairs,
    })
}
