//! `harness list`: what `--model`, `--strategy` and `--scheduler` accept.

use std::fmt::Write;

use crate::pipeline::{PIPELINE_CLASSES, SCHEDULER_NAMES};

/// The bundled tiny pipeline, relative to the repository root.
pub const BUNDLED_PIPELINE: &str = "fixtures/pipeline/pixart-alpha-tiny";

/// The text `harness list` prints.
pub fn list_text() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Models (--model takes a diffusers folder; nothing is downloaded):");
    let _ =
        writeln!(s, "  run      a pipeline folder: model_index.json and the class's components:");
    for c in PIPELINE_CLASSES {
        let _ = writeln!(
            s,
            "           {} ({} text tokens, guidance {}): {}",
            c.name,
            c.text_tokens,
            c.guidance_scale,
            c.components.iter().map(|c| format!("{c}/")).collect::<Vec<_>>().join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  forward  a transformer or U-Net folder (config.json + \
         diffusion_pytorch_model.safetensors) or a pipeline folder (its transformer/ or unet/)"
    );
    let _ = writeln!(s, "           transformer classes: {}", models_dit::KNOWN_CLASSES.join(", "));
    let _ =
        writeln!(s, "           U-Net classes: {} (SD 1.x, SD 2.x, SDXL)", models_unet::CLASS_NAME);
    let _ = writeln!(s, "  bundled  {BUNDLED_PIPELINE} (tiny random-weight PixArt-α, 128×128)");
    let _ = writeln!(
        s,
        "  presets  real-size configs with random weights (harness bench --model NAME): {}",
        models_dit::PRESETS.join(", ")
    );
    let _ = writeln!(s, "           U-Nets: {}", models_unet::PRESETS.join(", "));
    let _ = writeln!(
        s,
        "           real weights: a diffusers folder you already have, e.g. \
         PixArt-alpha/PixArt-XL-2-512x512"
    );
    let _ = writeln!(s);
    let _ =
        writeln!(s, "Strategies (--strategy NAME; options as [parallel.options] keys or flags):");
    let registry = crate::registry::<crate::CpuBackend>();
    for info in registry.infos() {
        let _ = writeln!(s, "  {:<13}{}", info.name, info.summary);
        for o in &info.options {
            let _ = writeln!(
                s,
                "      {} / --{} (default: {}): {}",
                o.key,
                o.key.replace('_', "-"),
                o.default,
                o.doc
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Mesh axes (ranks laid out innermost first: {}; neighbouring ranks hold the most \
         talkative axis):",
        parallel_core::Axis::ALL.iter().rev().map(|a| a.name()).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        s,
        "  tensor       tensor: heads / MLP columns / conv channels (--world-size of the group)"
    );
    let _ = writeln!(
        s,
        "  ulysses/ring usp: --ulysses-degree × --ring-degree (ulysses, ring: the whole group)"
    );
    let _ = writeln!(
        s,
        "  pipefusion   pipefusion: stages of consecutive blocks, each stage --ulysses-degree × \
         --ring-degree ranks splitting every patch again (PipeFusion × Ulysses / Ring / USP)"
    );
    let _ = writeln!(
        s,
        "  cfg          --cfg-degree 2 / [parallel] cfg_degree: the guidance batch's halves on \
         two groups of world-size / 2 ranks, with any strategy inside (one all-gather of the \
         noise prediction per step); needs guidance (scale > 1)"
    );
    let _ = writeln!(
        s,
        "  data         --dp-degree N / [parallel] dp_degree: N replicas of world-size / N ranks, \
         each generating its own image (seed + replica), sharing nothing per step"
    );
    let _ = writeln!(
        s,
        "  world size = dp_degree × cfg_degree × the strategy's group (usp: ulysses_degree × ring_degree; \
         pipefusion: stages × ulysses_degree × ring_degree)"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Schedulers (--scheduler NAME; default: the pipeline's own):");
    for (short, class) in SCHEDULER_NAMES {
        let _ = writeln!(s, "  {short:<22}{class}");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_registered_strategy_and_scheduler() {
        let text = super::list_text();
        for name in crate::registry::<crate::CpuBackend>().names() {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        for (short, class) in crate::pipeline::SCHEDULER_NAMES {
            assert!(text.contains(short) && text.contains(class));
        }
        assert!(text.contains("PixArt-XL-2-512x512"));
        assert!(text.contains("UNet2DConditionModel") && text.contains("sdxl-base"));
        assert!(text.contains("innermost first: tensor, ulysses, ring, pipefusion, cfg, data"));
        assert!(text.contains("--cfg-degree 2"));
    }
}
