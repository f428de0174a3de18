//! The `podman` command line, as the pods runtime uses it: the containers.conf this
//! machine needs, an internal network of the mesh's own (removed when dropped), and the
//! images built by `scripts/pod-images.sh`.
//!
//! When podman is missing or cannot run, every entry point fails with an error saying
//! why and how to install it (`source scripts/ensure-tools.sh`): never a silent skip.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::manifests::repo_root;

/// Errors of podman and the image script.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error(
        "podman cannot run here: {0}. The pods runtime needs Debian's podman, runc and iptables \
         and a containers.conf: run `source scripts/ensure-tools.sh` (as root it installs them)"
    )]
    Unavailable(String),
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("podman network {name}: {what}")]
    Network { name: String, what: String },
}

/// The containers.conf `scripts/ensure-podman.sh` writes.
fn default_containers_conf() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hopwatch").join("containers.conf"))
}

/// Runs podman with the machine's containers.conf.
#[derive(Debug, Clone)]
pub struct Podman {
    conf: Option<PathBuf>,
}

impl Podman {
    /// Finds podman and its containers.conf (`$CONTAINERS_CONF`, else the one
    /// `scripts/ensure-podman.sh` wrote); checks that podman answers.
    pub fn detect() -> Result<Podman, PodmanError> {
        let conf = std::env::var_os("CONTAINERS_CONF")
            .map(PathBuf::from)
            .or_else(|| default_containers_conf().filter(|p| p.is_file()));
        if conf.is_none() {
            return Err(PodmanError::Unavailable(
                "no containers.conf ($CONTAINERS_CONF unset and ~/.config/hopwatch/containers.conf missing)"
                    .into(),
            ));
        }
        let podman = Podman { conf };
        match podman
            .command()
            .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
            .output()
        {
            Ok(out) if out.status.success() => Ok(podman),
            Ok(out) => Err(PodmanError::Unavailable(format!(
                "`podman info` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Err(e) => Err(PodmanError::Unavailable(format!("cannot run podman: {e}"))),
        }
    }

    /// A `podman` command with the containers.conf set.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        if let Some(conf) = &self.conf {
            c.env("CONTAINERS_CONF", conf);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs `podman ARGS`, returning stdout; a failure carries stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, PodmanError> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| PodmanError::Unavailable(format!("cannot run podman: {e}")))?;
        check(&format!("podman {}", args.join(" ")), out)
    }

    /// Builds (or finds, by content) the images; returns (istio-proxy, demo, collector).
    pub fn images(
        &self,
        envoy: &Path,
        demo: &Path,
        collector: &Path,
    ) -> Result<Images, PodmanError> {
        let script = repo_root().join("scripts").join("pod-images.sh");
        let mut c = Command::new("bash");
        c.arg(&script).arg(envoy).arg(demo).arg(collector);
        if let Some(conf) = &self.conf {
            c.env("CONTAINERS_CONF", conf);
        }
        let out = c.stdin(Stdio::null()).output().map_err(|e| {
            PodmanError::Unavailable(format!("cannot run {}: {e}", script.display()))
        })?;
        let text = check(&format!("bash {}", script.display()), out)?;
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
                .ok_or_else(|| PodmanError::Failed {
                    command: format!("bash {}", script.display()),
                    status: "no image line".into(),
                    stderr: format!("no {name}= line in: {text}"),
                })
        };
        Ok(Images {
            proxy: get("istio-proxy")?,
            demo: get("demo")?,
            collector: get("collector")?,
        })
    }
}

fn check(command: &str, out: Output) -> Result<String, PodmanError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PodmanError::Failed {
            command: command.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The images a pod mesh runs.
#[derive(Debug, Clone)]
pub struct Images {
    /// Envoy + iptables-restore (istio-proxy and the init step, like Istio's proxyv2).
    pub proxy: String,
    pub demo: String,
    pub collector: String,
}

/// An internal podman network created for one mesh; removed (with whatever is still
/// attached) when dropped.
pub struct Network {
    podman: Podman,
    pub name: String,
    /// The subnet's first address and prefix length.
    pub subnet: (Ipv4Addr, u8),
    pub gateway: Ipv4Addr,
}

impl Network {
    /// `podman network create --internal NAME` (podman picks a free subnet): nothing on
    /// it can reach beyond it.
    pub fn create(
        podman: &Podman,
        name: &str,
        labels: &[(&str, String)],
    ) -> Result<Network, PodmanError> {
        let mut args: Vec<String> = vec!["network".into(), "create".into(), "--internal".into()];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push(name.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        podman.run(&refs)?;
        // From here on, dropping removes it.
        let mut network = Network {
            podman: podman.clone(),
            name: name.to_string(),
            subnet: (Ipv4Addr::UNSPECIFIED, 0),
            gateway: Ipv4Addr::UNSPECIFIED,
        };
        let inspect = podman.run(&["network", "inspect", name])?;
        let bad = |what: String| PodmanError::Network {
            name: name.to_string(),
            what,
        };
        let v: serde_json::Value =
            serde_json::from_str(&inspect).map_err(|e| bad(format!("inspect output: {e}")))?;
        let subnet = &v[0]["subnets"][0];
        let cidr = subnet["subnet"].as_str().unwrap_or_default();
        let (base, prefix) = cidr
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
            .ok_or_else(|| bad(format!("no IPv4 subnet in {inspect}")))?;
        if prefix > 24 {
            return Err(bad(format!("subnet {cidr} is smaller than a /24")));
        }
        network.subnet = (base, prefix);
        network.gateway = subnet["gateway"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| bad(format!("no gateway in {inspect}")))?;
        Ok(network)
    }

    /// The `n`-th address of the subnet.
    pub fn address(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.0) + n)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // -f also removes containers still attached (a pod that failed to go away).
        let _ = self
            .podman
            .command()
            .args(["network", "rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
