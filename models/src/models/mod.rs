//! One module per architecture: its configuration, weights and forward pass.

pub mod bert;
pub mod bloom;
pub mod llama;
