//! Every integration test of this crate in one binary: the VAE against diffusers, its banded
//! decode, image output, errors and timing.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod banded;
mod common;
mod errors;
mod image_output;
mod reference;
mod timing;
