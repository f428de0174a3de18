//! The local mesh of real Envoys that runs hopwatch on one machine, and the pieces its
//! tests share.

pub mod manifests;
