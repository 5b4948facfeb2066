//! The requests of one `harness run`: one image, `images_per_prompt` images of one prompt,
//! or a prompt file's prompts × `images_per_prompt` (batch generation), each with its own
//! seed and output files. The model is loaded once; every request gets a fresh strategy
//! state (`begin_request`); data-parallel replicas take every `dp_degree`-th request.
//!
//! A prompt file is one prompt per line (blank lines skipped), or JSON Lines — a file ending
//! in `.jsonl`, or whose first non-blank line starts with `{` — of objects with `prompt` and
//! optional `negative_prompt` and `seed` (the seed of the prompt's first image; image `k`
//! of it gets `seed + k`). Without a `seed`, request `i` (counting from 0 over the whole
//! file) gets the run's seed `+ i`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::RunConfig;
use crate::error::{HarnessError, Result};
use crate::run::replica_path;

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Its position in the run (0-based): what names its files.
    pub index: usize,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (see [`RunConfig::negative_prompt`]).
    pub negative_prompt: Option<String>,
    /// Seed of its initial noise.
    pub seed: u64,
    /// Where its PNG goes (`None`: nowhere).
    pub output: Option<PathBuf>,
    /// Where its final latents go, if anywhere.
    pub save_latents: Option<PathBuf>,
}

/// One line of a prompt file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptLine {
    /// The prompt.
    pub prompt: String,
    /// Its negative prompt.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// The seed of its first image.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The prompts of a prompt file (see the [module docs](self)).
///
/// # Errors
/// An unreadable file, a file without prompts, or a JSON line that is not an object with a
/// string `prompt` (naming the file and the line number).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let key = format!("--prompts {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| HarnessError::io(path, format!("cannot read the prompt file: {e}")))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl")
        || text
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('{'));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if jsonl {
            let p: PromptLine = serde_json::from_str(line).map_err(|e| {
                HarnessError::config(
                    format!("{key} line {}", i + 1),
                    format!(
                        "not a JSON object with a string `prompt` (and optional \
                         `negative_prompt`, `seed`): {e}"
                    ),
                )
            })?;
            out.push(p);
        } else {
            out.push(PromptLine { prompt: line.to_string(), negative_prompt: None, seed: None });
        }
    }
    if out.is_empty() {
        return Err(HarnessError::config(key, "the file has no prompts (one per line, or JSONL)"));
    }
    Ok(out)
}

/// Every request of `config`, in order.
///
/// # Errors
/// A bad prompt file; `--prompts` without `--output-dir`, or an output dir that is a file;
/// `--latents` or `--save-latents` where they would name one file for several images; an
/// `images_per_prompt` of 0.
pub fn requests(config: &RunConfig) -> Result<Vec<Request>> {
    let k = config.images_per_prompt;
    if k == 0 {
        return Err(HarnessError::config(
            "images_per_prompt (--images-per-prompt)",
            "must be at least 1",
        ));
    }
    let Some(file) = &config.prompts else {
        // One prompt: K images (or one per data-parallel replica), seeds seed + i.
        let dp = config.parallel.dp_degree.max(1);
        let n = if k == 1 { dp } else { k };
        if n > 1 && config.latents.is_some() {
            return Err(HarnessError::config(
                "--latents",
                format!(
                    "gives one initial noise, but this run draws {n} images ({}); drop \
                     --latents (image i starts from seed + i) or draw one image",
                    if k > 1 { "--images-per-prompt" } else { "one per data-parallel replica" }
                ),
            ));
        }
        let output = Some(&config.output).filter(|p| !p.as_os_str().is_empty());
        return Ok((0..n)
            .map(|i| Request {
                index: i,
                prompt: config.prompt.clone(),
                negative_prompt: config.negative_prompt.clone(),
                seed: config.seed.wrapping_add(i as u64),
                output: output.map(|p| replica_path(p, i, n)),
                save_latents: config.save_latents.as_ref().map(|p| replica_path(p, i, n)),
            })
            .collect());
    };
    let Some(dir) = &config.output_dir else {
        return Err(HarnessError::config(
            "--prompts",
            "batch generation writes one PNG per image: give --output-dir DIR (TOML `output_dir`)",
        ));
    };
    if dir.is_file() {
        return Err(HarnessError::config(
            format!("--output-dir {}", dir.display()),
            "is a file, not a folder",
        ));
    }
    for (set, flag) in
        [(config.latents.is_some(), "--latents"), (config.save_latents.is_some(), "--save-latents")]
    {
        if set {
            return Err(HarnessError::config(
                flag,
                "names one file, but --prompts draws an image per line; drop it (images are \
                 written to --output-dir, seeds in its metadata.jsonl)",
            ));
        }
    }
    let mut out = Vec::new();
    for line in read_prompts(file)? {
        for j in 0..k {
            let index = out.len();
            let seed = match line.seed {
                Some(s) => s.wrapping_add(j as u64),
                None => config.seed.wrapping_add(index as u64),
            };
            out.push(Request {
                index,
                prompt: line.prompt.clone(),
                negative_prompt: line
                    .negative_prompt
                    .clone()
                    .or_else(|| config.negative_prompt.clone()),
                seed,
                output: Some(dir.join(format!("{index:05}.png"))),
                save_latents: None,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("harness-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn prompt_files_are_lines_or_jsonl_and_bad_lines_are_named() {
        let p = write("a.txt", "a red circle\n\n  a blue square \n");
        let lines = read_prompts(&p).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].prompt, "a blue square");
        let p = write(
            "b.jsonl",
            "{\"prompt\": \"x\", \"seed\": 5}\n{\"prompt\": \"y\", \"negative_prompt\": \"z\"}\n",
        );
        let lines = read_prompts(&p).unwrap();
        assert_eq!((lines[0].seed, lines[1].negative_prompt.as_deref()), (Some(5), Some("z")));
        let p = write("c.jsonl", "{\"prompt\": \"x\"}\n{\"promt\": \"y\"}\n");
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("c.jsonl line 2") && e.contains("`prompt`"), "{e}");
        let p = write("d.txt", "\n \n");
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("no prompts"), "{e}");
        let e = read_prompts(Path::new("/no/such/prompts.txt")).unwrap_err().to_string();
        assert!(e.contains("/no/such/prompts.txt"), "{e}");
    }

    #[test]
    fn requests_number_seed_and_name_every_image() {
        let file = write("e.jsonl", "{\"prompt\": \"x\", \"seed\": 100}\n{\"prompt\": \"y\"}\n");
        let mut c = RunConfig { seed: 7, images_per_prompt: 2, ..RunConfig::default() };
        c.prompts = Some(file);
        let e = requests(&c).unwrap_err().to_string();
        assert!(e.contains("--output-dir"), "{e}");
        c.output_dir = Some(PathBuf::from("out/batch"));
        let r = requests(&c).unwrap();
        let seeds: Vec<u64> = r.iter().map(|r| r.seed).collect();
        // Line 1 seeds 100, 101; line 2 (no seed): run seed + index.
        assert_eq!(seeds, [100, 101, 9, 10]);
        assert_eq!(r[3].output.as_deref(), Some(Path::new("out/batch/00003.png")));
        // One prompt, three images: seeds 7, 8, 9, files out-0.png … out-2.png.
        let c = RunConfig {
            seed: 7,
            images_per_prompt: 3,
            output: "o/out.png".into(),
            ..RunConfig::default()
        };
        let r = requests(&c).unwrap();
        assert_eq!(r.iter().map(|r| r.seed).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(r[2].output.as_deref(), Some(Path::new("o/out-2.png")));
        // One image: the run's own files.
        let c = RunConfig { output: "o/out.png".into(), ..RunConfig::default() };
        assert_eq!(requests(&c).unwrap()[0].output.as_deref(), Some(Path::new("o/out.png")));
    }
}
