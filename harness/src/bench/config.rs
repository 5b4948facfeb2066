//! The benchmark's configuration: the TOML file's keys ([`BenchConfig`]), the strategies
//! it names ([`StrategyEntry`], resolved to [`StrategySpec`]), and the flags that override
//! them ([`BenchConfig::apply`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parallel_core::{LinkModel, OptionValue, Registry, StrategyOptions};
use serde::Deserialize;

use super::{BenchArgs, BenchError, Result};
use crate::CpuBackend as B;

/// A strategy to benchmark, with its options, as written in the config: a name
/// (`"ulysses"`) or a table (`{ name = "distrifusion", warmup_steps = 1, label = "df-w1" }`:
/// every key but `name` and `label` is an option of the strategy).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StrategyEntry {
    /// A strategy with its default options.
    Name(String),
    /// A strategy with options (and an optional label).
    Table(toml::Table),
}

/// A strategy to benchmark, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySpec {
    /// The label in the table and chart (the name, with options when given).
    pub label: String,
    /// The registered name.
    pub name: String,
    /// Its options.
    pub options: StrategyOptions,
    /// The options as given, for the report.
    pub option_text: BTreeMap<String, String>,
    /// CFG parallelism around the strategy (the table key `cfg_degree`, not a strategy
    /// option): 2 runs it on each half of the guidance batch over half the ranks.
    pub cfg_degree: usize,
}

impl StrategySpec {
    /// A strategy with its default options.
    pub fn named(name: &str) -> Self {
        StrategySpec {
            label: name.into(),
            name: name.into(),
            options: StrategyOptions::new(name),
            option_text: BTreeMap::new(),
            cfg_degree: 1,
        }
    }

    /// Sets option `key` (a label without options gets them appended); `cfg_degree` sets
    /// the composition's degree (checked by the run: 1 or 2).
    pub fn set(&mut self, key: &str, value: OptionValue) {
        if key == "cfg_degree" {
            self.cfg_degree = match value {
                OptionValue::Int(v) if v >= 0 => v as usize,
                // Refused when the configuration is created (1 or 2).
                _ => 0,
            };
            return;
        }
        self.option_text.insert(key.into(), value.to_string());
        self.options.set(key, value);
    }

    /// The strategy's name as reported: `cfg2×name` inside CFG parallelism.
    pub fn composed_name(&self) -> String {
        if self.cfg_degree == 1 {
            self.name.clone()
        } else {
            format!("cfg{}×{}", self.cfg_degree, self.name)
        }
    }

    fn default_label(&self) -> String {
        if self.option_text.is_empty() {
            return self.composed_name();
        }
        let opts: Vec<String> = self.option_text.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}[{}]", self.composed_name(), opts.join(","))
    }

    fn from_entry(entry: &StrategyEntry, index: usize) -> Result<Self> {
        let key = format!("strategies[{index}]");
        match entry {
            StrategyEntry::Name(n) => Ok(Self::named(n)),
            StrategyEntry::Table(t) => {
                let name = match t.get("name") {
                    Some(toml::Value::String(s)) => s.clone(),
                    _ => return Err(BenchError::config(key, "a table needs `name = \"...\"`")),
                };
                let mut spec = Self::named(&name);
                let mut label = None;
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("name", _) => {}
                        ("label", toml::Value::String(s)) => label = Some(s.clone()),
                        ("label", _) => {
                            return Err(BenchError::config(format!("{key}.label"), "a string"));
                        }
                        _ => spec.set(
                            k,
                            crate::config::option_value(v).ok_or_else(|| {
                                BenchError::config(
                                    format!("{key}.{k}"),
                                    "an integer, float, boolean or string",
                                )
                            })?,
                        ),
                    }
                }
                spec.label = label.unwrap_or_else(|| spec.default_label());
                Ok(spec)
            }
        }
    }
}

/// The benchmark configuration (`configs/bench.toml`). Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    /// A preset of [`models_dit::PRESETS`] (random weights of the real size) or a folder
    /// (a transformer folder or a pipeline folder). Default `PixArt-XL-2-512x512`.
    pub model: String,
    /// A preset with this many transformer blocks instead of its own (to fit a time budget;
    /// reported). Default: the preset's.
    pub layers: Option<usize>,
    /// Square image sizes in pixels; the latent is `size / 8` (the VAE's factor). Default
    /// `[512]`.
    pub resolutions: Vec<usize>,
    /// Denoising steps per request. Default 4.
    pub steps: usize,
    /// World sizes of the parallel strategies (1 adds serial on all cores). Default `[2]`.
    pub world_sizes: Vec<usize>,
    /// Strategies and their options. Default: every registered strategy but `serial`.
    pub strategies: Vec<StrategyEntry>,
    /// Timed requests per configuration (the median is reported). Default 3.
    pub repetitions: usize,
    /// Untimed requests before them. Default 1.
    pub warmup_runs: usize,
    /// Threads of each rank. Default `cores / world size` (at least 1).
    pub threads_per_rank: Option<usize>,
    /// Threads of the serial baseline. Default 1.
    pub serial_threads: usize,
    /// Cores to share between the ranks. Default: the machine's available parallelism.
    pub cores: Option<usize>,
    /// Seed of the random weights and inputs. Default 0.
    pub seed: u64,
    /// Classifier-free guidance scale (> 1: two images per evaluation). Default 4.5.
    pub guidance_scale: f64,
    /// Tokens of the random caption. Default 120 (PixArt-α's).
    pub text_tokens: usize,
    /// The denoiser's compute dtype (`f32`, `f16`, `bf16`). Default `f32`.
    pub dtype: crate::DtypeKind,
    /// Where random-weight presets are written (relative paths here and below are relative
    /// to the working directory). Default `target/bench/models`.
    pub model_cache: PathBuf,
    /// The JSON report. Default `target/bench/bench.json`.
    pub json: PathBuf,
    /// The SVG chart. Default `target/bench/bench.svg`.
    pub svg: PathBuf,
    /// Link models to run every parallel configuration under, one sweep each
    /// (`parallel_core::LinkModel::parse`: `"pcie4,dilation=700"`, …; `"none"` for instant
    /// transfers). Default: `["none"]`.
    pub links: Vec<String>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            model: "PixArt-XL-2-512x512".into(),
            layers: None,
            resolutions: vec![512],
            steps: 4,
            world_sizes: vec![2],
            strategies: Vec::new(),
            repetitions: 3,
            warmup_runs: 1,
            threads_per_rank: None,
            serial_threads: 1,
            cores: None,
            seed: 0,
            guidance_scale: 4.5,
            text_tokens: 120,
            dtype: crate::DtypeKind::F32,
            model_cache: "target/bench/models".into(),
            json: "target/bench/bench.json".into(),
            svg: "target/bench/bench.svg".into(),
            links: vec!["none".into()],
        }
    }
}

impl BenchConfig {
    /// Reads a TOML file; an unknown key or a bad value is an error naming it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            BenchError::Config { key, reason } => {
                BenchError::config(format!("{}: {key}", path.display()), reason)
            }
            e => e,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let key = e.span().map_or_else(String::new, |s| text[s].to_string());
            BenchError::config(key, e.message())
        })
    }

    /// Applies the flags that were given.
    pub fn apply(&mut self, args: &BenchArgs) -> Result<()> {
        if let Some(m) = &args.model {
            self.model = m.clone();
        }
        if args.layers.is_some() {
            self.layers = args.layers;
        }
        if !args.resolutions.is_empty() {
            self.resolutions = args.resolutions.clone();
        }
        if let Some(s) = args.steps {
            self.steps = s;
        }
        if !args.world_sizes.is_empty() {
            self.world_sizes = args.world_sizes.clone();
        }
        if !args.strategies.is_empty() {
            self.strategies =
                args.strategies.iter().map(|s| StrategyEntry::Name(s.clone())).collect();
        }
        if let Some(r) = args.repetitions {
            self.repetitions = r;
        }
        if let Some(w) = args.warmup_runs {
            self.warmup_runs = w;
        }
        if args.threads_per_rank.is_some() {
            self.threads_per_rank = args.threads_per_rank;
        }
        if let Some(t) = args.serial_threads {
            self.serial_threads = t;
        }
        if args.cores.is_some() {
            self.cores = args.cores;
        }
        if let Some(s) = args.seed {
            self.seed = s;
        }
        if let Some(d) = args.dtype {
            self.dtype = d;
        }
        if let Some(p) = &args.json {
            self.json = p.clone();
        }
        if let Some(p) = &args.svg {
            self.svg = p.clone();
        }
        if !args.links.is_empty() {
            self.links = args.links.clone();
        }
        Ok(())
    }

    /// The link models of the sweep, in order (`None`: instant transfers).
    ///
    /// # Errors
    /// A specification that does not parse, naming `links[i]` and the part at fault.
    pub fn link_models(&self) -> Result<Vec<Option<LinkModel>>> {
        self.links
            .iter()
            .enumerate()
            .map(|(i, spec)| match spec.trim() {
                "none" | "" => Ok(None),
                spec => LinkModel::parse(spec)
                    .map(Some)
                    .map_err(|e| BenchError::config(format!("links[{i}]"), e)),
            })
            .collect()
    }

    /// The strategies, resolved, with `--option strategy.key=value` flags applied.
    pub fn strategy_specs(
        &self,
        registry: &Registry<B>,
        flags: &[String],
    ) -> Result<Vec<StrategySpec>> {
        let mut specs: Vec<StrategySpec> = if self.strategies.is_empty() {
            registry
                .names()
                .into_iter()
                .filter(|n| *n != "serial")
                .map(StrategySpec::named)
                .collect()
        } else {
            self.strategies
                .iter()
                .enumerate()
                .map(|(i, e)| StrategySpec::from_entry(e, i))
                .collect::<Result<_>>()?
        };
        for flag in flags {
            let bad =
                || BenchError::config("--option", format!("`{flag}`: expected strategy.key=value"));
            let (lhs, value) = flag.split_once('=').ok_or_else(bad)?;
            let (name, key) = lhs.split_once('.').ok_or_else(bad)?;
            let mut hit = false;
            for s in specs.iter_mut().filter(|s| s.name == name) {
                let relabel = s.label == s.default_label();
                s.set(key, OptionValue::parse(value));
                if relabel {
                    s.label = s.default_label();
                }
                hit = true;
            }
            if !hit {
                return Err(BenchError::config(
                    "--option",
                    format!("`{flag}`: `{name}` is not benchmarked"),
                ));
            }
        }
        for (i, s) in specs.iter().enumerate() {
            registry
                .check_options(&s.name, &s.options)
                .map_err(|e| BenchError::config(format!("strategies[{i}]"), e))?;
        }
        Ok(specs)
    }

    /// Checks the values that need no model.
    pub fn check(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(BenchError::config("steps", "must be at least 1"));
        }
        if self.repetitions == 0 {
            return Err(BenchError::config("repetitions", "must be at least 1"));
        }
        if self.resolutions.is_empty() {
            return Err(BenchError::config("resolutions", "give at least one size in pixels"));
        }
        if let Some(&r) = self.resolutions.iter().find(|&&r| r == 0 || !r.is_multiple_of(8)) {
            return Err(BenchError::config(
                "resolutions",
                format!("{r} is not a positive multiple of 8 (the VAE factor)"),
            ));
        }
        if self.world_sizes.contains(&0) {
            return Err(BenchError::config("world_sizes", "world sizes must be at least 1"));
        }
        if self.threads_per_rank == Some(0) || self.serial_threads == 0 || self.cores == Some(0) {
            return Err(BenchError::config("threads_per_rank", "thread counts must be at least 1"));
        }
        if self.links.is_empty() {
            return Err(BenchError::config("links", "give at least one (\"none\" for no model)"));
        }
        self.link_models()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_unknown_keys_naming_them() {
        let e = BenchConfig::from_toml("stepz = 3").unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
    }

    #[test]
    fn strategy_tables_become_options_and_labels() {
        let c = BenchConfig::from_toml(
            r#"strategies = ["ulysses", { name = "distrifusion", warmup_steps = 1 }, { name = "pipefusion", label = "pf", num_pipeline_patch = 4 }]"#,
        )
        .unwrap();
        let specs = c.strategy_specs(&crate::registry::<B>(), &[]).unwrap();
        let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["ulysses", "distrifusion[warmup_steps=1]", "pf"]);
        assert_eq!(specs[1].options.usize("warmup_steps", 9).unwrap(), 1);
        let e = c
            .strategy_specs(&crate::registry::<B>(), &["ulysses.nope=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let specs = c
            .strategy_specs(&crate::registry::<B>(), &["distrifusion.warmup_steps=2".into()])
            .unwrap();
        assert_eq!(specs[1].label, "distrifusion[warmup_steps=2]");
        // `cfg_degree` composes CFG parallelism around the strategy; it is not an option.
        let c = BenchConfig::from_toml(r#"strategies = [{ name = "ulysses", cfg_degree = 2 }]"#)
            .unwrap();
        let specs = c.strategy_specs(&crate::registry::<B>(), &[]).unwrap();
        assert_eq!((specs[0].label.as_str(), specs[0].cfg_degree), ("cfg2×ulysses", 2));
        assert_eq!(specs[0].options.keys().count(), 0);
    }
}
