//! `scheduler_config.json`: parsing (lenient about Python's non-finite floats), the settings
//! shared by several schedulers, and the [`SchedulerConfig`] that picks a scheduler by
//! `_class_name`.
//!
//! Like diffusers, keys a class does not know are ignored (`_diffusers_version`, keys another
//! scheduler class wrote, …). Every key a class does know is read, so nothing diffusers would
//! act on is silently dropped: a value this crate does not implement is an
//! [`SchedulerError::Unsupported`] naming the key.

use std::path::Path;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};

use crate::SchedulerError;
use crate::scheduling_ddim::DdimConfig;
use crate::scheduling_dpmsolver_multistep::DpmSolverMultistepConfig;
use crate::scheduling_euler_discrete::EulerDiscreteConfig;
use crate::scheduling_flow_match_euler_discrete::FlowMatchEulerDiscreteConfig;
use crate::scheduling_pndm::PndmConfig;

/// The parsed config of one scheduler, chosen by the `_class_name` of `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    /// `DPMSolverMultistepScheduler` (PixArt's default).
    DpmSolverMultistep(DpmSolverMultistepConfig),
    /// `DDIMScheduler`.
    Ddim(DdimConfig),
    /// `EulerDiscreteScheduler`.
    EulerDiscrete(EulerDiscreteConfig),
    /// `FlowMatchEulerDiscreteScheduler`.
    FlowMatchEulerDiscrete(FlowMatchEulerDiscreteConfig),
    /// `PNDMScheduler` (Stable Diffusion 1.5's default).
    Pndm(PndmConfig),
}

impl SchedulerConfig {
    /// The diffusers class names this crate implements, in the order of the variants.
    pub const KNOWN_CLASSES: [&'static str; 5] = [
        DpmSolverMultistepConfig::CLASS_NAME,
        DdimConfig::CLASS_NAME,
        EulerDiscreteConfig::CLASS_NAME,
        FlowMatchEulerDiscreteConfig::CLASS_NAME,
        PndmConfig::CLASS_NAME,
    ];

    /// Reads and parses a `scheduler_config.json` (see [`SchedulerConfig::from_json`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchedulerError::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text)
    }

    /// Parses the text of a `scheduler_config.json` and checks that every setting is one this
    /// crate implements.
    ///
    /// Python's `json` writes `Infinity`, `-Infinity` and `NaN` for non-finite floats (DPM-Solver
    /// saves `"lambda_min_clipped": -Infinity`); these bare tokens are accepted wherever a float
    /// is expected.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        let map = parse_object(json)?;
        let Some(class) = map.get("_class_name").and_then(Value::as_str) else {
            return Err(SchedulerError::MissingClassName { known: Self::KNOWN_CLASSES.join(", ") });
        };
        Self::from_map(class, &map)
    }

    /// Parses a config as the given class whatever its `_class_name` says: diffusers'
    /// `DDIMScheduler.from_config(other_config)`, e.g. DDIM from Stable Diffusion 1.5's
    /// `PNDMScheduler` config. Keys the class does not know are ignored.
    pub fn from_json_as(class: &str, json: &str) -> Result<Self, SchedulerError> {
        Self::from_map(class, &parse_object(json)?)
    }

    /// Reads a config file as the given class (see [`SchedulerConfig::from_json_as`]).
    pub fn from_file_as(class: &str, path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchedulerError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_as(class, &text)
    }

    fn from_map(class: &str, map: &Map<String, Value>) -> Result<Self, SchedulerError> {
        let config = match class {
            DpmSolverMultistepConfig::CLASS_NAME => {
                Self::DpmSolverMultistep(parse_fields(DpmSolverMultistepConfig::CLASS_NAME, map)?)
            }
            DdimConfig::CLASS_NAME => Self::Ddim(parse_fields(DdimConfig::CLASS_NAME, map)?),
            EulerDiscreteConfig::CLASS_NAME => {
                Self::EulerDiscrete(parse_fields(EulerDiscreteConfig::CLASS_NAME, map)?)
            }
            FlowMatchEulerDiscreteConfig::CLASS_NAME => Self::FlowMatchEulerDiscrete(parse_fields(
                FlowMatchEulerDiscreteConfig::CLASS_NAME,
                map,
            )?),
            PndmConfig::CLASS_NAME => Self::Pndm(parse_fields(PndmConfig::CLASS_NAME, map)?),
            other => {
                return Err(SchedulerError::UnknownClass {
                    class: other.to_string(),
                    known: Self::KNOWN_CLASSES.join(", "),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// The diffusers class name of this config (`"DDIMScheduler"`, …).
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::DpmSolverMultistep(_) => DpmSolverMultistepConfig::CLASS_NAME,
            Self::Ddim(_) => DdimConfig::CLASS_NAME,
            Self::EulerDiscrete(_) => EulerDiscreteConfig::CLASS_NAME,
            Self::FlowMatchEulerDiscrete(_) => FlowMatchEulerDiscreteConfig::CLASS_NAME,
            Self::Pndm(_) => PndmConfig::CLASS_NAME,
        }
    }

    /// Checks that every setting is one this crate implements; the error names the first key
    /// that is not.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        match self {
            Self::DpmSolverMultistep(c) => c.validate(),
            Self::Ddim(c) => c.validate(),
            Self::EulerDiscrete(c) => c.validate(),
            Self::FlowMatchEulerDiscrete(c) => c.validate(),
            Self::Pndm(c) => c.validate(),
        }
    }
}

/// Parses JSON text, accepting Python's non-finite float tokens, into its top-level object.
fn parse_object(json: &str) -> Result<Map<String, Value>, SchedulerError> {
    let text = quote_non_finite_tokens(json);
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(SchedulerError::Json { message: "the top level is not an object".into() }),
        Err(e) => Err(SchedulerError::Json { message: e.to_string() }),
    }
}

/// Deserializes one class's config from the JSON object; on failure, finds the key at fault by
/// deserializing each key alone (every field has a default), so the error can name it.
fn parse_fields<T: DeserializeOwned>(
    class: &'static str,
    map: &Map<String, Value>,
) -> Result<T, SchedulerError> {
    match T::deserialize(Value::Object(map.clone())) {
        Ok(config) => Ok(config),
        Err(whole) => {
            for (key, value) in map {
                let single: Map<String, Value> =
                    [(key.clone(), value.clone())].into_iter().collect();
                if let Err(e) = T::deserialize(Value::Object(single)) {
                    return Err(SchedulerError::InvalidValue {
                        class,
                        key: key.clone(),
                        message: e.to_string(),
                    });
                }
            }
            Err(SchedulerError::InvalidValue {
                class,
                key: "<several>".into(),
                message: whole.to_string(),
            })
        }
    }
}

/// Rewrites the bare tokens `-Infinity`, `Infinity` and `NaN` found outside JSON strings into
/// the strings `"-Infinity"`, `"Infinity"` and `"NaN"`, which the float fields accept.
pub(crate) fn quote_non_finite_tokens(json: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(json.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            let after = rest[token.len()..].chars().next();
            if !after.is_some_and(|a| a.is_alphanumeric() || a == '_') {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Serde helpers for fields whose JSON diffusers writes loosely.
pub(crate) mod lenient {
    use super::*;

    struct F64Visitor;

    impl Visitor<'_> for F64Visitor {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, Infinity, -Infinity or NaN")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }

    /// A float that may be written `Infinity`, `-Infinity` or `NaN`.
    pub(crate) fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64Visitor)
    }

    /// An optional float (`null` is `None`) that may be written `Infinity`, `-Infinity`, `NaN`.
    pub(crate) fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "f64")] f64);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    /// A list of floats or `null`.
    pub(crate) fn opt_f64_list<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<f64>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "f64")] f64);
        Ok(Option::<Vec<Wrap>>::deserialize(d)?.map(|v| v.into_iter().map(|w| w.0).collect()))
    }

    /// A flag where `null` means `false`, as Python's truthiness reads it.
    pub(crate) fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
    }
}

/// `beta_schedule`: how the training betas are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    /// `"linear"`: `torch.linspace(beta_start, beta_end, n)`.
    #[serde(rename = "linear")]
    Linear,
    /// `"scaled_linear"`: `torch.linspace(beta_start**0.5, beta_end**0.5, n) ** 2`.
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// `"squaredcos_cap_v2"`: the Glide cosine schedule (`betas_for_alpha_bar`).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// `prediction_type`: what the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    /// `"epsilon"`: the noise.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// `"sample"`: the clean sample.
    #[serde(rename = "sample")]
    Sample,
    /// `"original_sample"`: Euler's alias of `"sample"`.
    #[serde(rename = "original_sample")]
    OriginalSample,
    /// `"v_prediction"`: the velocity `alpha_t·eps − sigma_t·x0`.
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// `"flow_prediction"`: DPM-Solver with flow sigmas (not implemented).
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
}

impl PredictionType {
    pub(crate) fn json(self) -> &'static str {
        match self {
            Self::Epsilon => "\"epsilon\"",
            Self::Sample => "\"sample\"",
            Self::OriginalSample => "\"original_sample\"",
            Self::VPrediction => "\"v_prediction\"",
            Self::FlowPrediction => "\"flow_prediction\"",
        }
    }
}

/// `timestep_spacing`: how inference timesteps are picked from the training ones (Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    /// `"linspace"`.
    #[serde(rename = "linspace")]
    Linspace,
    /// `"leading"` (adds `steps_offset`).
    #[serde(rename = "leading")]
    Leading,
    /// `"trailing"`.
    #[serde(rename = "trailing")]
    Trailing,
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmasType {
    /// `"zero"`: the last step lands on a clean sample.
    #[serde(rename = "zero")]
    Zero,
    /// `"sigma_min"`: the sigma of training timestep 0.
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// Error helper: `Unsupported` for a key whose value is not the one this crate implements.
pub(crate) fn unsupported(
    class: &'static str,
    key: &'static str,
    value: impl std::fmt::Display,
    supported: &'static str,
) -> SchedulerError {
    SchedulerError::Unsupported { class, key, value: value.to_string(), supported }
}

/// Error unless a flag is off.
pub(crate) fn require_false(
    class: &'static str,
    key: &'static str,
    value: bool,
) -> Result<(), SchedulerError> {
    if value { Err(unsupported(class, key, true, "false")) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_are_quoted_outside_strings_only() {
        let src = r#"{"a": -Infinity, "b": [Infinity, NaN], "s": "NaN -Infinity \" Infinity"}"#;
        let out = quote_non_finite_tokens(src);
        assert_eq!(
            out,
            r#"{"a": "-Infinity", "b": ["Infinity", "NaN"], "s": "NaN -Infinity \" Infinity"}"#
        );
    }
}
