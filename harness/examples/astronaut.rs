//! The minimal program: a PixArt pipeline folder, PipeFusion with 2 patches on 2 ranks,
//! "An astronaut riding a green horse" with seed 42 and 20 steps, `astronaut.png` from rank 0.
//!
//! ```sh
//! cargo run --release -p harness --example astronaut                  # the tiny bundled pipeline
//! cargo run --release -p harness --example astronaut -- /path/to/PixArt-XL-2-512x512 4
//! ```

use strategy_pipefusion::PipeFusionConfig;

fn main() -> Result<(), harness::HarnessError> {
    let mut args = std::env::args().skip(1);
    let folder = args.next().unwrap_or_else(|| "fixtures/pipeline/pixart-alpha-tiny".into());
    let ranks = args.next().and_then(|n| n.parse().ok()).unwrap_or(2);

    let pipe = harness::PixArtPipeline::from_folder(&folder)?
        .with_strategy(&PipeFusionConfig::default().with_num_pipeline_patch(2), ranks);
    let prompt = harness::Prompt::new("An astronaut riding a green horse").seed(42).steps(20);
    let out = pipe.generate(&prompt)?;
    out.save("astronaut.png")?;
    println!("astronaut.png: {}", out.report.summary());
    Ok(())
}
