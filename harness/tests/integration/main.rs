//! Every integration test of this crate in one binary: the CLI, bench and the pipelines against diffusers.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod bench;
mod cli;
mod flux_pipeline_parity;
mod pipeline_parity;
mod sd3_pipeline_parity;
mod sd_pipeline_parity;
