//! The collector's web view in a real browser: headless Chromium (Debian `chromium`),
//! driven over WebDriver by Debian's `chromedriver`, against the collector of the local
//! demo mesh (real Envoys running the filter; cart's app copies only x-request-id, so the
//! cart -> pricing call starts a new piece of the trace; recommendations' app is down).
//!
//! The page is opened before any traffic: the findings must appear without a reload.
//! Then it checks the DOM: findings listed, the kind filter, a trace tree with the broken
//! hop marked, the "continued in" link to the other piece of a broken trace, and a broken
//! edge in the service graph. Screenshots are kept under `target/web-view/`.
//!
//! Needs: `chromium` and `chromedriver` (`scripts/ensure-tools.sh` installs them), Envoy,
//! the wasm and the collector binaries (as the e2e tests).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hopwatch_test_envoy::mesh::{new_trace_id, Ingress, Mesh, MeshOptions};
use hopwatch_test_envoy::topology::{topologies_dir, Topology};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

// ------------------------------------------------------------ a minimal WebDriver client

/// One HTTP/1.1 exchange with chromedriver on 127.0.0.1 (JSON in, JSON out).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            let _ = s.read_to_end(&mut buf);
        }
    }
    let rest = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let payload = if head.contains("transfer-encoding: chunked") {
        dechunk(&rest)
    } else {
        rest
    };
    let v: Value = serde_json::from_str(&payload).map_err(|e| format!("{e}: {payload}"))?;
    if v["value"]["error"].is_string() {
        return Err(format!("{method} {path}: {}", v["value"]));
    }
    Ok(v)
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// chromedriver, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Browser {
    port: u16,
    session: String,
    /// Dropped after `Browser::drop` ended the session (which closes Chromium).
    _driver: Driver,
    _profile: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn need(tool: &str) -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is not on PATH: install it with `source scripts/ensure-tools.sh` (Debian packages chromium, chromium-driver)");
}

impl Browser {
    fn start(profile: PathBuf) -> Browser {
        let chromium = need("chromium");
        let driver_bin = need("chromedriver");
        let port = free_port();
        // Killed on every way out, a failed start included.
        let driver = Driver(
            Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        let start = Instant::now();
        while http(port, "GET", "/status", None)
            .map(|v| v["value"]["ready"] != true)
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < DEADLINE,
                "chromedriver did not become ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("profile dir");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1500,1250",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v = http(port, "POST", "/session", Some(&caps)).expect("new browser session");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        Browser {
            port,
            session,
            _driver: driver,
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        http(self.port, method, &path, body.as_ref()).unwrap_or_else(|e| panic!("{e}"))["value"]
            .clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` until it returns something truthy (not false/null/0/""/[]).
    fn wait(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, json!([]));
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if start.elapsed() > DEADLINE {
                let dom = self.js("return document.body.innerText", json!([]));
                panic!(
                    "waiting for {what}: timed out; page text:\n{}",
                    dom.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn click(&self, css: &str) {
        let e = self.cmd(
            "POST",
            "element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        let id = e
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string();
        self.cmd("POST", &format!("element/{id}/click"), Some(json!({})));
    }

    fn screenshot(&self, file: &Path) {
        let b64 = self.cmd("GET", "screenshot", None);
        let png = base64_decode(b64.as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(file, png).expect("write screenshot");
        eprintln!("screenshot: {}", file.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ------------------------------------------------------------------------------ the test

fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-view");
    std::fs::create_dir_all(&d).expect("target/web-view");
    // No "..": chromedriver does not find Chromium's DevToolsActivePort file under a
    // --user-data-dir that has one.
    d.canonicalize().expect("canonical target/web-view")
}

#[test]
fn web_view_in_headless_chromium_against_the_demo_mesh() {
    let topology = Topology::load(&topologies_dir().join("demo.yaml")).expect("demo topology");
    let mut options = MeshOptions::named("web-view");
    options.demo_service = Some(PathBuf::from(env!("CARGO_BIN_EXE_hopwatch-demo-service")));
    options.keep_run_dir = std::env::var_os("HOPWATCH_KEEP_RUNS").is_some();
    let mesh =
        Mesh::start(&topology, &options).unwrap_or_else(|e| panic!("starting the demo mesh: {e}"));
    let out = artifacts();
    let browser = Browser::start(out.join("chromium-profile"));
    let page = format!("http://127.0.0.1:{}/", mesh.plan().collector_http);

    // Open the page first: nothing yet.
    browser.goto(&page);
    browser.wait(
        "the page to load",
        "return document.querySelector('#status').textContent.startsWith('live')",
    );
    assert_eq!(
        browser.js(
            "return document.querySelectorAll('tr.finding').length",
            json!([])
        ),
        0
    );
    let offline = browser.js(
        "return [...document.querySelectorAll('script[src],link[href]')].map(e => e.src || e.href).filter(u => !u.startsWith(location.origin))",
        json!([]),
    );
    assert_eq!(offline, json!([]), "assets from elsewhere");

    // Traffic through the mesh, as from an ingress gateway.
    for _ in 0..3 {
        mesh.send(
            &Ingress::new()
                .with_trace(&new_trace_id())
                .header(&topology.tag_header, "dev.proj1"),
        )
        .expect("entry request");
    }
    // The findings appear live (no reload).
    let kinds = browser.wait(
        "the three demo findings to appear without a reload",
        "const k = [...document.querySelectorAll('tr.finding')].map(r => r.dataset.kind); \
         return ['UPSTREAM_FAILURE','TRACE_NOT_PROPAGATED','TAG_NOT_PROPAGATED'].every(x => k.includes(x)) ? k : null",
    );
    eprintln!("findings listed: {kinds}");
    assert_eq!(
        browser.js("return location.href", json!([])),
        json!(page),
        "the page was not reloaded"
    );

    // Filter by kind, then by workload, then back to all.
    let set = "const [sel, v] = arguments; const s = document.querySelector(sel); s.value = v; \
               s.dispatchEvent(new Event('change')); \
               return [...document.querySelectorAll('tr.finding')].map(r => [r.dataset.kind, r.dataset.workload])";
    let only = browser.js(set, json!(["#f-kind", "UPSTREAM_FAILURE"]));
    let rows = only.as_array().expect("rows");
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r[0] == "UPSTREAM_FAILURE"),
        "{only}"
    );
    browser.js(set, json!(["#f-kind", ""]));
    let cart = browser.js(set, json!(["#f-workload", "cart"]));
    let rows = cart.as_array().expect("rows");
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r[1] == "cart"),
        "{cart}"
    );
    assert!(rows.iter().all(|r| r[0] != "UPSTREAM_FAILURE"), "{cart}");
    browser.js(set, json!(["#f-workload", ""]));
    let severity = browser.js(set, json!(["#f-severity", "WARNING"]));
    assert!(
        severity
            .as_array()
            .is_some_and(|r| !r.is_empty() && r.iter().all(|r| r[0] == "TAG_NOT_PROPAGATED")),
        "{severity}"
    );
    browser.js(set, json!(["#f-severity", ""]));

    // The UPSTREAM_FAILURE's trace: the frontend -> recommendations call is marked broken.
    browser.click("tr.finding[data-kind='UPSTREAM_FAILURE']");
    let broken = browser.wait(
        "the trace tree with the broken hop marked",
        "const b = [...document.querySelectorAll('#trace li.call.broken')].map(l => [l.dataset.call, l.dataset.breaks]); \
         return b.length ? b : null",
    );
    assert!(
        broken.as_array().expect("calls").iter().any(|c| c[0]
            .as_str()
            .unwrap_or("")
            .contains("recommendations")
            && c[1].as_str().unwrap_or("").contains("UPSTREAM_FAILURE")),
        "{broken}"
    );
    let tree_text = browser.js(
        "return document.querySelector('#trace').innerText",
        json!([]),
    );
    let tree_text = tree_text.as_str().unwrap_or("");
    for want in ["hint:", "UF", "tag=dev.proj1", "trace="] {
        assert!(
            tree_text.contains(want),
            "no {want:?} in the trace panel:\n{tree_text}"
        );
    }
    // The graph: frontend -> recommendations drawn as a broken edge.
    let edges = browser.wait(
        "a broken edge in the service graph",
        "const e = [...document.querySelectorAll('#graph svg path.edge.broken')].map(p => [p.dataset.from, p.dataset.to, p.dataset.kinds]); \
         return e.length ? e : null",
    );
    let edges = edges.as_array().expect("edges").clone();
    assert!(
        edges.iter().any(
            |e| e[1].as_str().unwrap_or("").ends_with("/recommendations")
                && e[2].as_str().unwrap_or("").contains("UPSTREAM_FAILURE")
        ),
        "{edges:?}"
    );
    browser.screenshot(&out.join("web-view-upstream-failure.png"));

    // The TRACE_NOT_PROPAGATED finding: its sample is a trace id (the piece cart was
    // serving), `hopwatch trace` takes it, and the page links on to the piece after the break.
    let tnp = browser.js(
        "return document.querySelector(\"tr.finding[data-kind='TRACE_NOT_PROPAGATED']\").dataset.id",
        json!([]),
    );
    let listed = mesh.breaks().expect("hopwatch breaks");
    let tnp_finding = listed
        .iter()
        .find(|b| b["id"] == tnp)
        .expect("the TNP finding");
    let sample = tnp_finding["trace_ids"][0]
        .as_str()
        .expect("a sample")
        .to_string();
    assert!(
        sample.len() == 32 && sample.chars().all(|c| c.is_ascii_hexdigit()),
        "sample of TRACE_NOT_PROPAGATED is not a trace id: {sample} ({tnp_finding})"
    );
    let cli = mesh.cli(&["trace", &sample]).expect("hopwatch trace");
    assert!(cli.success, "hopwatch trace {sample}: {}", cli.stderr);
    assert!(cli.stdout.contains("continued in"), "{}", cli.stdout);
    browser.click("tr.finding[data-kind='TRACE_NOT_PROPAGATED']");
    browser.wait(
        "the 'continued in' link of the broken trace",
        "return document.querySelector('#fragments a.fragment[data-relation=continued_in]')",
    );
    // The request went on in more than one piece (cart's call without trace headers, and
    // pricing's sidecar starting a trace of its own): the break is in one of them.
    let links = browser.js(
        "return [...document.querySelectorAll('#fragments a.fragment[data-relation=continued_in]')].map(a => a.dataset.trace)",
        json!([]),
    );
    let links: Vec<String> = links
        .as_array()
        .expect("links")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mut piece = Value::Null;
    for id in &links {
        browser.click(&format!("#fragments a.fragment[data-trace='{id}']"));
        browser.wait(
            "the linked piece to load",
            &format!("return document.querySelector('#trace-id').textContent === '{id}' && document.querySelector('#trace .tree, #trace p')"),
        );
        let marked = browser.js(
            "return [...document.querySelectorAll('#trace li.call.broken')].map(l => [l.dataset.call, l.dataset.breaks])",
            json!([]),
        );
        if marked.as_array().is_some_and(|m| {
            m.iter()
                .any(|x| x[1].as_str().unwrap_or("").contains("TRACE_NOT_PROPAGATED"))
        }) {
            piece = marked;
            break;
        }
        // Back to the traced piece, to try the next link.
        browser.click("tr.finding[data-kind='TRACE_NOT_PROPAGATED']");
        browser.wait(
            "the 'continued in' links again",
            "return document.querySelector('#fragments a.fragment[data-relation=continued_in]')",
        );
    }
    assert!(
        piece.as_array().is_some_and(|calls| calls.iter().any(|c| {
            let call = c[0].as_str().unwrap_or("");
            call.contains("cart") && call.contains("pricing")
        })),
        "no linked piece ({links:?}) shows cart -> pricing with TRACE_NOT_PROPAGATED: {piece}"
    );
    browser.wait(
        "the link back to where the request came from",
        "return document.querySelector('#fragments a.fragment[data-relation=continued_from]')",
    );
    assert!(
        edges
            .iter()
            .any(|e| e[0].as_str().unwrap_or("").ends_with("/cart")
                && e[2].as_str().unwrap_or("").contains("TRACE_NOT_PROPAGATED")),
        "{edges:?}"
    );
    browser.screenshot(&out.join("web-view-fragment.png"));
    drop(browser);
    drop(mesh);
}
