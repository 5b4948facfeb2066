//! The strategy registry: names to constructors, filled explicitly by the binary.
//!
//! Each strategy crate exports `NAME`, its options and a `register(&mut Registry<B>)`
//! function; the harness calls one `register` per strategy crate (behind a cargo feature).
//! No link-time magic: what is registered is what the binary's source says.

use std::collections::BTreeMap;
use std::fmt;

use burn::tensor::backend::Backend;

use crate::comm::Comm;
use crate::error::{ParallelError, Result};
use crate::model::ModelFamily;
use crate::seams::GroupNormMode;
use crate::strategy::{ParallelStrategy, SerialStrategy};

/// A strategy option's value, as it comes from a TOML file or a command-line flag.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

impl OptionValue {
    /// The value of a command-line `key=value` assignment: an integer, a float or a
    /// boolean if the text reads as one, else the text (without surrounding quotes).
    ///
    /// ```
    /// use parallel_core::OptionValue;
    /// assert_eq!(OptionValue::parse("4"), OptionValue::Int(4));
    /// assert_eq!(OptionValue::parse("0.5"), OptionValue::Float(0.5));
    /// assert_eq!(OptionValue::parse("true"), OptionValue::Bool(true));
    /// assert_eq!(OptionValue::parse("\"10,9,9\""), OptionValue::Str("10,9,9".into()));
    /// ```
    pub fn parse(text: &str) -> Self {
        let text = text.trim();
        if let Ok(i) = text.parse() {
            OptionValue::Int(i)
        } else if let Ok(f) = text.parse() {
            OptionValue::Float(f)
        } else if let Ok(b) = text.parse() {
            OptionValue::Bool(b)
        } else {
            OptionValue::Str(text.trim_matches('"').to_string())
        }
    }
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Int(v) => write!(f, "{v}"),
            OptionValue::Float(v) => write!(f, "{v}"),
            OptionValue::Bool(v) => write!(f, "{v}"),
            OptionValue::Str(v) => write!(f, "\"{v}\""),
        }
    }
}

/// A strategy's documented option.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionInfo {
    /// The config key (snake_case), also the flag `--key-with-dashes`.
    pub key: &'static str,
    /// The default, as shown by `harness list`.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// A registered strategy's name, summary, options and the configurations the shared
/// conformance suite must run it in.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyInfo {
    /// The registered name.
    pub name: &'static str,
    /// One line on what it splits.
    pub summary: &'static str,
    /// Its options.
    pub options: Vec<OptionInfo>,
    /// What the conformance suite runs it in, and what it must equal there. The suite
    /// iterates the registry: a strategy is tested by registering, in every case it lists.
    pub suite: Vec<SuiteCase>,
}

/// One configuration of a strategy the conformance suite runs: options, world sizes, and
/// the definition its output must equal.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteCase {
    /// Options set (the others at their defaults).
    pub options: Vec<(&'static str, OptionValue)>,
    /// World sizes to run at.
    pub world_sizes: Vec<usize>,
    /// What the output must equal, at every step of a denoising loop and in a lone forward.
    pub reference: Reference,
    /// The family of models the case is run on, where its options act on one family only
    /// (`None`: every fixture).
    pub family: Option<ModelFamily>,
}

impl SuiteCase {
    /// A case with the default options at `world_sizes`, equal to `reference`.
    pub fn new(world_sizes: &[usize], reference: Reference) -> Self {
        SuiteCase {
            options: Vec::new(),
            world_sizes: world_sizes.to_vec(),
            reference,
            family: None,
        }
    }

    /// This case run on models of `family` only.
    pub fn only(mut self, family: ModelFamily) -> Self {
        self.family = Some(family);
        self
    }

    /// This case with option `key = value`.
    pub fn with(mut self, key: &'static str, value: OptionValue) -> Self {
        self.options.push((key, value));
        self
    }

    /// The options as a registry takes them, for strategy `name`.
    pub fn strategy_options(&self, name: &str) -> StrategyOptions {
        let mut o = StrategyOptions::new(name);
        for (k, v) in &self.options {
            o.set(*k, v.clone());
        }
        o
    }
}

/// What a strategy's output is, by definition: the conformance suite builds each of these
/// independently, on one rank, from the serial model and its seams, and requires the
/// strategy to equal it. "Bands" are the latent's token rows cut into `N` (world size)
/// contiguous parts, balanced, longer first (10 rows over 4 ranks: 3, 3, 2, 2).
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// The serial model at every step: every self-attention sees fresh K/V of every token.
    Serial,
    /// Displaced patch parallelism (DistriFusion): steps `< warmup_steps` equal serial;
    /// after them band `r`, run on its own, attends in every self-attention to its own
    /// fresh K/V and to the other bands' K/V of the previous step at that layer. On a U-Net
    /// it also reads, at every `k × k` convolution, the neighbouring bands' boundary rows of
    /// the previous step at that convolution, and normalises every GroupNorm with the
    /// statistics `norm` names (a DiT has neither, and ignores `norm`).
    DisplacedPatches {
        /// Synchronous (exact) steps first.
        warmup_steps: usize,
        /// The group-norm statistics after warmup.
        norm: GroupNormMode,
    },
    /// Naive patch parallelism: every band runs on its own and attends to its own tokens.
    LocalPatches,
    /// Displaced patch pipelining (PipeFusion): steps `< warmup_steps` equal serial; after
    /// them the latent's token rows are cut into `patches` parts run in order, and at every
    /// layer patch `p` of step `t` attends to the K/V of patches `q ≤ p` of step `t` and of
    /// patches `q > p` of step `t − 1`; each patch is stepped by the scheduler with its own
    /// region state.
    PipelinedPatches {
        /// Patches `M` (independent of the world size: stages split layers, not tokens).
        patches: usize,
        /// Synchronous (exact) steps first.
        warmup_steps: usize,
    },
}

impl Reference {
    /// Whether the output equals serial at step `step` and before: fresh strategies at every
    /// step, stale ones during warmup.
    pub fn is_serial_through(&self, step: usize) -> bool {
        match self {
            Reference::Serial => true,
            Reference::DisplacedPatches { warmup_steps, .. }
            | Reference::PipelinedPatches { warmup_steps, .. } => step < *warmup_steps,
            Reference::LocalPatches => false,
        }
    }
}

/// Options given to a strategy, checked against its [`StrategyInfo`] by the registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyOptions {
    strategy: String,
    values: BTreeMap<String, OptionValue>,
}

impl StrategyOptions {
    /// Options for `strategy` (named in errors).
    pub fn new(strategy: impl Into<String>) -> Self {
        StrategyOptions { strategy: strategy.into(), values: BTreeMap::new() }
    }

    /// These options with `key = value`.
    pub fn with(mut self, key: impl Into<String>, value: OptionValue) -> Self {
        self.values.insert(key.into(), value);
        self
    }

    /// Sets `key = value`.
    pub fn set(&mut self, key: impl Into<String>, value: OptionValue) {
        self.values.insert(key.into(), value);
    }

    /// The strategy these options are for.
    pub fn strategy(&self) -> &str {
        &self.strategy
    }

    /// The keys given.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The options given, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OptionValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn bad(&self, key: &str, reason: String) -> ParallelError {
        ParallelError::BadOption { strategy: self.strategy.clone(), key: key.into(), reason }
    }

    /// A non-negative integer option, or `default` when absent.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.values.get(key) {
            None => Ok(default),
            Some(OptionValue::Int(v)) if *v >= 0 => Ok(*v as usize),
            Some(v) => Err(self.bad(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    /// An optional non-negative integer option.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.values.contains_key(key) { self.usize(key, 0).map(Some) } else { Ok(None) }
    }

    /// A boolean option, or `default` when absent.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.values.get(key) {
            None => Ok(default),
            Some(OptionValue::Bool(v)) => Ok(*v),
            Some(v) => Err(self.bad(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A string option, or `default` when absent.
    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.values.get(key) {
            None => Ok(default.to_string()),
            Some(OptionValue::Str(v)) => Ok(v.clone()),
            Some(v) => Err(self.bad(key, format!("expected a string, got {v}"))),
        }
    }
}

/// A strategy's options as a typed value, for library users: what they pass instead of a
/// name and `key=value` strings. Each strategy crate exports one (`PipeFusionConfig`, …);
/// [`options`](StrategyConfig::options) gives the same options a TOML file or flags would,
/// and the crate's registered constructor parses them back with the config's own
/// `from_options`, so the typed and the textual path are one path.
pub trait StrategyConfig: fmt::Debug {
    /// The registered name of the strategy this configures.
    fn name(&self) -> &'static str;
    /// The options, as the registry takes them (defaults may be left out).
    fn options(&self) -> StrategyOptions;
}

/// The config of a strategy that takes no options: its name. Such a crate exports
/// `pub const CONFIG: NoOptions = NoOptions(NAME);`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoOptions(pub &'static str);

impl StrategyConfig for NoOptions {
    fn name(&self) -> &'static str {
        self.0
    }

    fn options(&self) -> StrategyOptions {
        StrategyOptions::new(self.0)
    }
}

/// Builds a strategy instance for one rank from its world communicator and options.
pub type StrategyCtor<B> = fn(Comm<B>, &StrategyOptions) -> Result<Box<dyn ParallelStrategy<B>>>;

/// Strategies by name.
pub struct Registry<B: Backend> {
    entries: BTreeMap<&'static str, (StrategyInfo, StrategyCtor<B>)>,
}

impl<B: Backend> fmt::Debug for Registry<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

impl<B: Backend> Default for Registry<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Registry<B> {
    /// A registry holding the serial reference strategy.
    pub fn new() -> Self {
        let mut r = Registry { entries: BTreeMap::new() };
        r.register(
            StrategyInfo {
                name: SerialStrategy::<B>::NAME,
                summary: "one rank, no split: the reference every strategy is compared with",
                options: vec![],
                suite: vec![SuiteCase::new(&[1], Reference::Serial)],
            },
            |comm, _| Ok(Box::new(SerialStrategy::new(comm)?)),
        );
        r
    }

    /// Adds (or replaces) a strategy.
    pub fn register(&mut self, info: StrategyInfo, ctor: StrategyCtor<B>) {
        self.entries.insert(info.name, (info, ctor));
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// The registered strategies' descriptions, sorted by name.
    pub fn infos(&self) -> impl Iterator<Item = &StrategyInfo> {
        self.entries.values().map(|(i, _)| i)
    }

    /// The description of `name`.
    pub fn info(&self, name: &str) -> Result<&StrategyInfo> {
        self.entries.get(name).map(|(i, _)| i).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> ParallelError {
        ParallelError::UnknownStrategy {
            name: name.to_string(),
            known: self.names().into_iter().map(String::from).collect(),
        }
    }

    /// Checks that every option given is one the strategy declares.
    pub fn check_options(&self, name: &str, options: &StrategyOptions) -> Result<()> {
        let info = self.info(name)?;
        for key in options.keys() {
            if !info.options.iter().any(|o| o.key == key) {
                let known: Vec<&str> = info.options.iter().map(|o| o.key).collect();
                return Err(ParallelError::BadOption {
                    strategy: name.into(),
                    key: key.into(),
                    reason: if known.is_empty() {
                        "this strategy takes no options".into()
                    } else {
                        format!("unknown option; known options: {}", known.join(", "))
                    },
                });
            }
        }
        Ok(())
    }

    /// A strategy instance for the rank of `comm`.
    pub fn create(
        &self,
        name: &str,
        comm: Comm<B>,
        options: &StrategyOptions,
    ) -> Result<Box<dyn ParallelStrategy<B>>> {
        self.check_options(name, options)?;
        let (_, ctor) = self.entries.get(name).ok_or_else(|| self.unknown(name))?;
        ctor(comm, options)
    }

    /// A strategy instance for the rank of `comm` with `cfg_degree` (1 or 2): with 2, the
    /// world's ranks form two groups of half the size, each running `name` on its half of the
    /// guidance batch ([`CfgParallel`](crate::CfgParallel)); with 1, [`create`](Self::create).
    ///
    /// # Errors
    /// An unknown name or option, a degree other than 1 or 2, an odd world with degree 2, or
    /// the strategy's refusal of its group.
    pub fn create_with_cfg(
        &self,
        name: &str,
        comm: Comm<B>,
        options: &StrategyOptions,
        cfg_degree: usize,
    ) -> Result<Box<dyn ParallelStrategy<B>>> {
        crate::cfg::cfg_mesh(comm.size(), cfg_degree)?;
        if cfg_degree == 1 {
            return self.create(name, comm, options);
        }
        self.check_options(name, options)?;
        let (_, ctor) = self.entries.get(name).ok_or_else(|| self.unknown(name))?;
        Ok(Box::new(crate::CfgParallel::new(comm, |group| ctor(group, options))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{LaunchOptions, LocalComm};
    use burn_flex::Flex;

    fn comm(n: usize) -> Comm<Flex> {
        LocalComm::create(n, &LaunchOptions::default()).remove(0)
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let mut r = Registry::<Flex>::new();
        r.register(
            StrategyInfo { name: "zeta", summary: "test", options: vec![], suite: vec![] },
            |c, _| Ok(Box::new(SerialStrategy::new(c)?)),
        );
        let e = r.create("ulyses", comm(1), &StrategyOptions::new("ulyses")).err().unwrap();
        assert_eq!(e.to_string(), "unknown strategy `ulyses`; known strategies: serial, zeta");
    }

    #[test]
    fn unknown_option_is_named() {
        let r = Registry::<Flex>::new();
        let opts = StrategyOptions::new("serial").with("warmup_steps", OptionValue::Int(1));
        let e = r.create("serial", comm(1), &opts).err().unwrap().to_string();
        assert!(e.contains("`warmup_steps`") && e.contains("takes no options"), "{e}");
    }

    #[test]
    fn option_types_are_checked() {
        let o = StrategyOptions::new("x")
            .with("a", OptionValue::Int(-1))
            .with("b", OptionValue::Str("yes".into()));
        assert!(o.usize("a", 0).unwrap_err().to_string().contains("option `a`"));
        assert!(o.bool("b", false).unwrap_err().to_string().contains("option `b`"));
        assert_eq!(o.usize("missing", 7).unwrap(), 7);
    }

    #[test]
    fn serial_refuses_more_than_one_rank() {
        let r = Registry::<Flex>::new();
        let e = r.create("serial", comm(2), &StrategyOptions::new("serial")).err().unwrap();
        assert!(e.to_string().contains("--world-size 1"), "{e}");
    }
}
