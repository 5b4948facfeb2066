//! Every integration test of this crate in one binary: the DiT/PixArt transformers against diffusers, their seams and errors.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod common;
mod diffusers_parity;
mod errors;
mod presets;
mod seams;
mod tensor_parallel;
