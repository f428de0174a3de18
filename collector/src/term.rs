//! What the terminal allows: its width (tables are fitted to it) and whether to colour
//! (only on a terminal, never when `NO_COLOR` is set: <https://no-color.org>).

use std::io::IsTerminal;

/// `--color` of the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal and NO_COLOR is unset.
    Auto,
    /// Colour even into a pipe (e.g. `| less -R`), unless NO_COLOR is set.
    Always,
    Never,
}

/// Whether NO_COLOR asks for no colour (set and not empty).
pub fn no_color_env() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Whether stdout gets ANSI colour.
pub fn use_color(choice: ColorChoice) -> bool {
    if no_color_env() {
        return false;
    }
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal(),
    }
}

/// The width to fit tables into: `$COLUMNS` when set (as shells export it), else the
/// terminal's width when stdout is one, else none (a pipe or a file gets whole lines).
pub fn table_width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
    {
        return Some(c);
    }
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    terminal_columns()
}

#[cfg(unix)]
fn terminal_columns() -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize struct we pass; the fd is stdout's, open.
    let r = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

#[cfg(not(unix))]
fn terminal_columns() -> Option<usize> {
    None
}
