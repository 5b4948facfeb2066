//! Every integration test of this crate in one binary: the U-Nets against diffusers, their bands and errors.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod bands;
mod common;
mod diffusers_parity;
mod errors;
