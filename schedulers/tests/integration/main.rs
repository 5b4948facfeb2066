//! Every integration test of this crate in one binary: the schedulers against diffusers.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod config;
mod diffusers_parity;
mod pndm;
mod variants;
