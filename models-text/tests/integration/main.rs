//! Every integration test of this crate in one binary: T5 and CLIP encoders and tokenizers against transformers.
//! (One test binary links once; on CI's 2 cores each extra binary cost a link of Burn.)

mod clip_loading;
mod clip_reference;
mod common;
mod loading;
mod t5_reference;
mod tokenizer;
mod tokenizer_files;
