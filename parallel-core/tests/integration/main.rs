//! Every integration test of this crate in one binary: the communicator rules, collectives, failures and the TCP transport.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod collectives;
mod failures;
mod rules;
mod tcp;
mod transport;
