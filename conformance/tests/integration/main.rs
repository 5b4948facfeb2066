//! Every integration test of this crate in one binary: every registered strategy over every fixture (forward, denoise, stale references, a new strategy).
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod denoise;
mod forward;
mod new_strategy;
mod stale;
