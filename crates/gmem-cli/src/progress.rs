//! Progress on a terminal: one line on stderr, redrawn in place (`\r` and erase-line), and
//! erased when the work ends. Nothing at all when stderr is not a terminal, so that piped or
//! redirected output (and `--json`) carries no progress.

use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether progress is drawn (stderr is a terminal).
pub fn enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// Draws `[####    ] done/total what` (`gmem bench`).
pub fn bar(done: usize, total: usize, what: &str) {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    draw(&format!(
        "[{}{}] {done}/{total} {what}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    ));
}

/// Replaces the progress line with `line`.
fn draw(line: &str) {
    let mut e = std::io::stderr();
    let _ = write!(e, "\r\x1b[2K{line}");
    let _ = e.flush();
}

/// Erases the progress line.
pub fn clear() {
    draw("");
}

/// `what: N s` on stderr, redrawn every 250 ms by a thread until dropped (`gmem run`, whose
/// workload reports nothing until it ends). Does nothing unless stderr is a terminal.
#[derive(Debug)]
pub struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts the ticker (a no-op one when stderr is not a terminal).
    pub fn start(what: String) -> Ticker {
        if !enabled() {
            return Ticker {
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let start = Instant::now();
        let thread = std::thread::spawn(move || loop {
            draw(&format!("{what}: {:.0} s", start.elapsed().as_secs_f64()));
            match stopped.recv_timeout(Duration::from_millis(250)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        });
        Ticker {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            clear();
        }
    }
}
