//! The `hopwatch` CLI run against a local mesh's collector, the way a user runs it: one
//! implementation for both runtimes ([`crate::mesh::Mesh`] and [`crate::pods::PodMesh`]),
//! which only differ in where the collector listens.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::{self, MissingArtifact};

/// The output of one `hopwatch` CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Missing(#[from] MissingArtifact),
    #[error("running {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("`hopwatch {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
}

/// The CLI pointed at one collector.
pub struct CollectorCli<'a> {
    /// The `hopwatch` binary; `None`: found as [`bins::cli_bin`] finds it.
    pub bin: Option<&'a Path>,
    /// The collector's gRPC URL (`http://ADDR:PORT`).
    pub url: String,
}

impl CollectorCli<'_> {
    /// Runs `hopwatch --collector URL ARGS...`.
    pub fn run(&self, args: &[&str]) -> Result<CliOutput, CliError> {
        let bin = match self.bin {
            Some(b) => b.to_path_buf(),
            None => bins::cli_bin()?,
        };
        let out = Command::new(&bin)
            .arg("--collector")
            .arg(&self.url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CliError::Spawn {
                bin: bin.clone(),
                source,
            })?;
        Ok(CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `hopwatch breaks --output json`, parsed.
    pub fn breaks(&self) -> Result<Vec<Value>, CliError> {
        let args = ["breaks", "--output", "json"];
        let out = self.run(&args)?;
        if !out.success {
            return Err(CliError::Failed {
                args: args.join(" "),
                status: "non-zero exit".into(),
                stderr: out.stderr,
            });
        }
        match serde_json::from_str::<Value>(&out.stdout) {
            Ok(Value::Array(items)) => Ok(items),
            _ => Err(CliError::Failed {
                args: args.join(" "),
                status: "output is not a JSON array".into(),
                stderr: out.stdout,
            }),
        }
    }

    /// Polls `hopwatch breaks` until `done` holds for the findings, or `timeout` passes
    /// (the error carries the last findings seen, or the last error).
    pub fn wait_for_breaks(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, CliError> {
        let start = Instant::now();
        let mut last;
        loop {
            match self.breaks() {
                Ok(found) => {
                    if done(&found) {
                        return Ok(found);
                    }
                    last = serde_json::to_string(&found).unwrap_or_default();
                }
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > timeout {
                return Err(CliError::Timeout {
                    what: what.to_string(),
                    waited: timeout,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
