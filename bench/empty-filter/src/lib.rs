//! The empty Rust proxy-wasm HTTP filter: a root context and an HTTP context that do
//! nothing (every callback continues). Envoy still creates the context, crosses into the
//! VM for each callback and back: this is the floor any Rust proxy-wasm filter pays,
//! measured by `filter-bench` next to no filter, Lua and hopwatch.
//!
//! Built with `cargo build -p hopwatch-empty-filter --target wasm32-wasip1 --release`;
//! natively it compiles to an empty library so workspace builds and tests still link.

#[cfg(target_os = "wasi")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(EmptyRoot) });
    }}

    struct EmptyRoot;

    impl Context for EmptyRoot {}

    impl RootContext for EmptyRoot {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(EmptyHttp))
        }
    }

    struct EmptyHttp;

    impl Context for EmptyHttp {}

    // All callbacks keep the SDK's defaults: Action::Continue.
    impl HttpContext for EmptyHttp {}
}
