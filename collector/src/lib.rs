//! hopwatch collector: receives hop reports from the hopwatch filters, joins them into call
//! chains per trace, detects where a tag chain or a trace chain broke and where a failure
//! started, stores those findings and answers queries.
//!
//! Layout:
//! - [`model`]: the compact hop ([`model::CHop`]) and string interning.
//! - [`other_ids`]: grouping by other tracers' trace ids and custom correlation ids.
//! - [`analysis`]: joining hops into a call tree and the break detectors (pure); the
//!   newer detectors live in their own modules: [`app_error`], [`policy_denied`], with
//!   gRPC status names and hints in [`grpc`].
//! - [`hidden_hop`]: calls no sidecar saw as HTTP (TCP-named Service ports), as HOP_MISSING.
//! - [`core`]: open trace groups, quiet/age queues, bounds, recently analysed traces;
//!   [`budget`]: the stores' byte budgets.
//! - [`store`]: the deduplicated findings index; [`persist`]: its redb database, the
//!   recovery from write errors and the checkpoint; [`wal`]: the write-ahead log of hops.
//! - [`identity`]: who may report (mTLS peer from XFCC, report token, clock skew).
//! - [`service`]: shared state, metrics, Report/Query semantics.
//! - [`metrics`]: `/metrics` via prometheus-client (the occurrence counter, the
//!   scrape-time snapshot); [`process`]: the `process_*` figures from /proc.
//! - [`web`]: the web view at `/` (embedded assets, JSON API); [`graph`]: its service
//!   graph; [`fragments`]: request id -> trace pieces ("continued in ...").
//! - [`server`]: tonic + HTTP front ends, background loops, graceful shutdown.
//! - [`cli`]: the `hopwatch` command's rendering (tables, trees, JSON); [`term`]: terminal
//!   width and colour; [`watch`]: what `hopwatch watch` prints when.

pub mod analysis;
pub mod app_error;
pub mod budget;
pub mod cli;
pub mod core;
pub mod fragments;
pub mod graph;
pub mod grpc;
pub mod hidden_hop;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod other_ids;
pub mod persist;
pub mod policy_denied;
pub mod process;
pub mod server;
pub mod service;
pub mod store;
pub mod term;
pub mod wal;
pub mod watch;
pub mod web;
