//! The empty Rust proxy-wasm HTTP filter: a root context and an HTTP context that do
//! nothing (every callback continues). Envoy still creates the context, crosses into the
//! VM for each callback and back: this is the floor any Rust proxy-wasm filter pays,
//! measured by `filter-bench` next to no filter, Lua and hopwatch.
//!
//! With a plugin configuration such as `get_property=10,increment_metric=5` it becomes a
//! *host-call probe* instead: on request headers it makes that many calls of each kind
//! (nothing else), so `filter-bench` can price one host call of each kind in this Envoy
//! (`(CPU per request of the probe - of the empty filter) / N`). Without a configuration
//! (the `empty-wasm` benchmark configuration) the HTTP context is the no-op one.
//!
//! Built with `cargo build -p hopwatch-empty-filter --target wasm32-wasip1 --release`;
//! natively it compiles to an empty library so workspace builds and tests still link.

#[cfg(target_os = "wasi")]
mod wasm {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(EmptyRoot { probe: Vec::new(), metric: 0 })
        });
    }}

    /// One kind of host call the probe makes.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        /// `get_property(["source", "address"])`.
        GetProperty,
        /// `increment_metric` of a counter defined at configure time.
        IncrementMetric,
        /// `get_shared_data` of a 400-byte value.
        GetSharedData,
        /// `set_shared_data` of a 400-byte value (no CAS).
        SetSharedData,
        /// `get_http_request_headers` (the whole map).
        GetHeaders,
        /// `get_http_request_header("x-b3-traceid")`.
        GetHeader,
        /// `set_http_request_header("x-probe", "1")`.
        SetHeader,
        /// `get_current_time`.
        GetTime,
    }

    fn parse(config: &str) -> Vec<(Op, u32)> {
        config
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                let op = match k.trim() {
                    "get_property" => Op::GetProperty,
                    "increment_metric" => Op::IncrementMetric,
                    "get_shared_data" => Op::GetSharedData,
                    "set_shared_data" => Op::SetSharedData,
                    "get_headers" => Op::GetHeaders,
                    "get_header" => Op::GetHeader,
                    "set_header" => Op::SetHeader,
                    "get_time" => Op::GetTime,
                    _ => return None,
                };
                Some((op, v.trim().parse().ok()?))
            })
            .collect()
    }

    const SHARED_KEY: &str = "bench.probe";
    const SHARED_VALUE: [u8; 400] = [7u8; 400];

    struct EmptyRoot {
        probe: Vec<(Op, u32)>,
        metric: u32,
    }

    impl Context for EmptyRoot {}

    impl RootContext for EmptyRoot {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = self.get_plugin_configuration().unwrap_or_default();
            self.probe = parse(&String::from_utf8_lossy(&config));
            if !self.probe.is_empty() {
                self.metric = hostcalls::define_metric(MetricType::Counter, "bench.probe")
                    .unwrap_or_default();
                let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&SHARED_VALUE), None);
            }
            true
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            if self.probe.is_empty() {
                Some(Box::new(EmptyHttp))
            } else {
                Some(Box::new(ProbeHttp {
                    probe: self.probe.clone(),
                    metric: self.metric,
                }))
            }
        }
    }

    struct EmptyHttp;

    impl Context for EmptyHttp {}

    // All callbacks keep the SDK's defaults: Action::Continue.
    impl HttpContext for EmptyHttp {}

    struct ProbeHttp {
        probe: Vec<(Op, u32)>,
        metric: u32,
    }

    impl Context for ProbeHttp {}

    impl HttpContext for ProbeHttp {
        fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
            let mut sink = 0usize;
            for &(op, n) in &self.probe {
                for _ in 0..n {
                    match op {
                        Op::GetProperty => {
                            sink += hostcalls::get_property(vec!["source", "address"])
                                .ok()
                                .flatten()
                                .map(|b| b.len())
                                .unwrap_or(0)
                        }
                        Op::IncrementMetric => {
                            let _ = hostcalls::increment_metric(self.metric, 1);
                        }
                        Op::GetSharedData => {
                            sink += hostcalls::get_shared_data(SHARED_KEY)
                                .ok()
                                .and_then(|(v, _)| v)
                                .map(|b| b.len())
                                .unwrap_or(0)
                        }
                        Op::SetSharedData => {
                            let _ =
                                hostcalls::set_shared_data(SHARED_KEY, Some(&SHARED_VALUE), None);
                        }
                        Op::GetHeaders => sink += self.get_http_request_headers().len(),
                        Op::GetHeader => {
                            sink += self
                                .get_http_request_header("x-b3-traceid")
                                .map(|v| v.len())
                                .unwrap_or(0)
                        }
                        Op::SetHeader => self.set_http_request_header("x-probe", Some("1")),
                        Op::GetTime => {
                            let _ = hostcalls::get_current_time();
                        }
                    }
                }
            }
            std::hint::black_box(sink);
            Action::Continue
        }
    }
}
