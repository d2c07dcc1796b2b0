//! `gmem map`: a picture of guest memory over time. For each guest_memfd of a `gmem exec
//! --trace` file (or of a `gmem run --map` run), an SVG memory map: the file's pages from top
//! (offset 0) to bottom, time from left to right (one step per conversion in a trace, which
//! has no clock; real time for a run), each cell shaded by the share of its pages that are
//! private at that moment; the memslots binding the file, with their GPA ranges, on the
//! right; every conversion a tick above the map (a failed one in red), and punch-holes below.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use gmem::PAGE_SIZE;

use crate::usage::UsageError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A trace written by `gmem exec --trace FILE`.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Where to write the SVG.
    #[arg(short, long, value_name = "FILE.svg")]
    output: PathBuf,
}

/// One change of a file, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `KVM_SET_MEMORY_ATTRIBUTES2`: the range, the direction, and the errno name if it failed.
    Convert {
        offset: u64,
        size: u64,
        private: bool,
        failed: Option<String>,
        /// Seconds since the start, where known.
        at: Option<f64>,
    },
    /// A punch-hole of the range.
    Punch { offset: u64, size: u64 },
}

/// A memslot binding (part of) a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub slot: u64,
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
}

/// What happened to one guest_memfd.
#[derive(Debug, Clone, PartialEq)]
pub struct FileHistory {
    /// How it is named in the picture (`guest_memfd 1 (vm1, fd 11)`).
    pub label: String,
    pub size: u64,
    /// Whether its pages start private (created without `INIT_SHARED`).
    pub init_private: bool,
    pub memslots: Vec<Binding>,
    pub events: Vec<Event>,
}

/// The value of `key=0x...` (or a decimal) in `line`.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let v: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The text after ` -> ` (the answer), trimmed of any parenthesised note.
fn answer(line: &str) -> Option<&str> {
    let a = line.rsplit_once(" -> ")?.1;
    Some(a.split(" (").next().unwrap_or(a).trim())
}

/// The number after `call(` up to the first `,` or `)`: a descriptor, or `vmN`.
fn first_arg<'a>(line: &'a str, call: &str) -> Option<&'a str> {
    let start = line.find(&format!("{call}("))? + call.len() + 1;
    let rest = &line[start..];
    let end = rest.find([',', ')'])?;
    Some(rest[..end].trim())
}

/// The files of a `gmem exec --trace` file, with their memslots and changes, in order. Lines
/// it does not know are skipped; descriptors are followed through `dup*` and `close`.
pub fn parse_trace(text: &str) -> Vec<FileHistory> {
    let mut files: Vec<FileHistory> = Vec::new();
    let mut by_fd: std::collections::BTreeMap<String, usize> = Default::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let ok = answer(line).is_some_and(|a| !a.starts_with("-1"));
        if line.contains("KVM_CREATE_GUEST_MEMFD") {
            let (Some(size), Some(fd)) = (field(line, "size"), answer(line)) else {
                continue;
            };
            if !ok {
                continue;
            }
            let vm = first_arg(line, "ioctl").unwrap_or("vm?");
            let flags = line
                .split("flags=")
                .nth(1)
                .and_then(|f| f.split(')').next())
                .unwrap_or("");
            files.push(FileHistory {
                label: format!(
                    "guest_memfd {} ({vm}, fd {fd}, flags {flags})",
                    files.len() + 1
                ),
                size,
                init_private: !flags.contains("init_shared") && !flags.contains("0x2"),
                memslots: Vec::new(),
                events: Vec::new(),
            });
            by_fd.insert(fd.to_string(), files.len() - 1);
        } else if line.contains("KVM_SET_MEMORY_ATTRIBUTES2") {
            let Some(&i) = first_arg(line, "ioctl").and_then(|fd| by_fd.get(fd)) else {
                continue;
            };
            let (Some(offset), Some(size), Some(attrs)) = (
                field(line, "offset"),
                field(line, "size"),
                field(line, "attributes"),
            ) else {
                continue;
            };
            let failed = (!ok).then(|| {
                answer(line)
                    .and_then(|a| a.split_whitespace().nth(1))
                    .unwrap_or("error")
                    .to_string()
            });
            files[i].events.push(Event::Convert {
                offset,
                size,
                private: attrs != 0,
                failed,
                at: None,
            });
        } else if line.contains("KVM_SET_USER_MEMORY_REGION2") && line.contains("gmem fd=") {
            let Some(&i) = line
                .split("gmem fd=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|fd| by_fd.get(fd))
            else {
                continue;
            };
            if let (true, Some(slot), Some(gpa), Some(size), Some(offset)) = (
                ok,
                field(line, "slot"),
                field(line, "gpa"),
                field(line, "size"),
                field(line, "offset"),
            ) {
                files[i].memslots.push(Binding {
                    slot,
                    gpa,
                    size,
                    offset,
                });
            }
        } else if let Some(fd) = first_arg(line, "fallocate") {
            let Some(&i) = by_fd.get(fd) else { continue };
            // fallocate(fd, mode, offset, len): mode 0x3 is KEEP_SIZE | PUNCH_HOLE.
            let args: Vec<u64> = line
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(a, _)| {
                    a.split(',')
                        .skip(1)
                        .filter_map(|v| {
                            u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok()
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let [mode, offset, size] = args[..] {
                if ok && mode & 2 != 0 {
                    files[i].events.push(Event::Punch { offset, size });
                }
            }
        } else if line.contains(" guest_memfd -> ") && line.contains("close(") {
            if let Some(fd) = first_arg(line, "close") {
                by_fd.remove(fd);
            }
        } else if let Some((call, new)) = line.split_once(" -> ").and_then(|(l, r)| {
            let call = l.split_whitespace().nth(2)?;
            (call.starts_with("dup") || call.starts_with("fcntl")).then_some((call, r.trim()))
        }) {
            let old = call
                .split_once('(')
                .and_then(|(_, r)| r.split([')', ',']).next());
            if let Some(&i) = old.and_then(|o| by_fd.get(o.trim())) {
                by_fd.insert(new.to_string(), i);
            }
        }
    }
    files
}

/// The history of the file of a `gmem run --map` run, from its conversion log.
pub fn from_log(
    label: String,
    size: u64,
    memslots: Vec<Binding>,
    records: &[gmem::ConversionRecord],
) -> FileHistory {
    FileHistory {
        label,
        size,
        init_private: false,
        memslots,
        events: records
            .iter()
            .map(|r| Event::Convert {
                offset: r.offset,
                size: r.size,
                private: r.attributes != 0,
                failed: r.result.err().map(gmem::Errno::name),
                at: Some(r.at.as_secs_f64()),
            })
            .collect(),
    }
}

/// Columns (time) and rows (pages) of a map at most.
const COLUMNS: usize = 480;
const ROWS: usize = 160;
/// The map's size in the picture, whatever the number of cells.
const PLOT_W: f64 = 720.0;
const PLOT_H: f64 = 160.0;

fn shade(fraction: f64) -> String {
    // White (shared) to deep purple (private).
    let lerp = |a: f64, b: f64| (a + (b - a) * fraction).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(244.0, 76.0),
        lerp(244.0, 29.0),
        lerp(248.0, 149.0)
    )
}

/// One file's map as an SVG group at `y0`; returns its height.
fn draw_file(svg: &mut String, f: &FileHistory, y0: f64) -> f64 {
    let npages = f.size.div_ceil(PAGE_SIZE).max(1);
    let rows = usize::try_from(npages).unwrap_or(ROWS).clamp(1, ROWS);
    let page_row = |p: u64| ((p as u128 * rows as u128) / npages as u128) as usize;
    let mut per_row = vec![0u64; rows];
    for p in 0..npages.min(1 << 26) {
        per_row[page_row(p)] += 1;
    }
    let mut private = vec![false; usize::try_from(npages.min(1 << 26)).unwrap_or(0)];
    let mut count = vec![0u64; rows];
    if f.init_private {
        private.iter_mut().for_each(|p| *p = true);
        count.clone_from(&per_row);
    }
    let converts: Vec<&Event> = f.events.iter().collect();
    let n = converts.len().max(1);
    let columns = n.min(COLUMNS);
    let total_time = converts
        .iter()
        .filter_map(|e| match e {
            Event::Convert { at: Some(t), .. } => Some(*t),
            _ => None,
        })
        .fold(0.0, f64::max);
    let timed = total_time > 0.0;
    let column_of = |i: usize, e: &Event| -> usize {
        match e {
            Event::Convert { at: Some(t), .. } if timed => {
                ((t / total_time) * (columns - 1) as f64).round() as usize
            }
            _ => i * columns / n,
        }
    };
    let (x0, top) = (70.0, y0 + 34.0);
    let (width, height) = (PLOT_W, PLOT_H);
    let (cell_w, cell_h) = (width / columns as f64, height / rows as f64);
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="13" font-weight="bold">{} — {} KiB, {} changes</text>"#,
        y0 + 14.0,
        xml(&f.label),
        f.size >> 10,
        f.events.len()
    );
    let mut ticks = String::new();
    let mut column_cells: Vec<Vec<f64>> = Vec::with_capacity(columns);
    let mut next = 0usize;
    for c in 0..columns {
        while next < converts.len() && column_of(next, converts[next]) <= c {
            let e = converts[next];
            let x = x0 + (c as f64 + 0.5) * cell_w;
            match e {
                Event::Convert {
                    offset,
                    size,
                    private: to_private,
                    failed,
                    ..
                } => {
                    let colour = if failed.is_some() {
                        "#d62728"
                    } else if *to_private {
                        "#4c1d95"
                    } else {
                        "#9ca3af"
                    };
                    let _ = writeln!(
                        ticks,
                        r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="{colour}" stroke-width="1"/>"#,
                        top - 10.0,
                        top - 3.0
                    );
                    if failed.is_none() {
                        for p in offset / PAGE_SIZE..(offset + size).div_ceil(PAGE_SIZE) {
                            if let Some(slot) = private.get_mut(p as usize) {
                                if *slot != *to_private {
                                    *slot = *to_private;
                                    let r = page_row(p);
                                    if *to_private {
                                        count[r] += 1;
                                    } else {
                                        count[r] -= 1;
                                    }
                                }
                            }
                        }
                    }
                }
                Event::Punch { .. } => {
                    let _ = writeln!(
                        ticks,
                        r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#f59e0b" stroke-width="1"/>"##,
                        top + height + 3.0,
                        top + height + 10.0
                    );
                }
            }
            next += 1;
        }
        column_cells.push(
            count
                .iter()
                .zip(&per_row)
                .map(|(&c, &t)| if t == 0 { 0.0 } else { c as f64 / t as f64 })
                .collect(),
        );
    }
    // Cells, merged along time where the shade does not change (rows outer, columns inner:
    // the cells are stored per column).
    #[allow(clippy::needless_range_loop)]
    for r in 0..rows {
        let mut c = 0;
        while c < columns {
            let v = column_cells[c][r];
            let mut end = c + 1;
            while end < columns && (column_cells[end][r] - v).abs() < 1e-9 {
                end += 1;
            }
            let _ = writeln!(
                svg,
                r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"/>"#,
                x0 + c as f64 * cell_w,
                top + r as f64 * cell_h,
                (end - c) as f64 * cell_w,
                cell_h,
                shade(v)
            );
            c = end;
        }
    }
    svg.push_str(&ticks);
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#333"/>"##
    );
    // Offsets on the left, memslots on the right, time below.
    for (y, label) in [
        (top + 4.0, "0".to_string()),
        (top + height, format!("{:#x}", f.size)),
    ] {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{y:.1}" font-size="9" text-anchor="end">{label}</text>"#,
            x0 - 4.0
        );
    }
    for b in &f.memslots {
        let ya = top + (b.offset as f64 / f.size.max(1) as f64) * height;
        let yb = top + ((b.offset + b.size) as f64 / f.size.max(1) as f64) * height;
        let xr = x0 + width + 6.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{xr}" y1="{ya:.1}" x2="{xr}" y2="{:.1}" stroke="#2563eb" stroke-width="3"/><text x="{}" y="{:.1}" font-size="9">slot {:#x}: GPA {:#x}–{:#x}</text>"##,
            yb - 1.0,
            xr + 5.0,
            (ya + yb) / 2.0 + 3.0,
            b.slot,
            b.gpa,
            b.gpa + b.size
        );
    }
    let axis = if timed {
        format!("time → ({total_time:.3} s)")
    } else {
        format!("changes in trace order → ({})", f.events.len())
    };
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{:.1}" font-size="10">{axis}</text>"#,
        top + height + 22.0
    );
    height + 62.0
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG of `files` under `title`.
pub fn render(files: &[FileHistory], title: &str) -> String {
    let mut body = String::new();
    let mut y = 44.0;
    for f in files {
        y += draw_file(&mut body, f, y);
    }
    if files.is_empty() {
        body.push_str(r#"<text x="20" y="70" font-size="12">no guest_memfd in this trace</text>"#);
        y += 40.0;
    }
    let width = 70.0 + PLOT_W + 260.0;
    let legend = format!(
        r##"<rect x="20" y="{l}" width="10" height="10" fill="{}" stroke="#333"/><text x="34" y="{t}" font-size="10">shared</text><rect x="90" y="{l}" width="10" height="10" fill="{}" stroke="#333"/><text x="104" y="{t}" font-size="10">private</text><line x1="165" y1="{l}" x2="165" y2="{b}" stroke="#4c1d95"/><text x="170" y="{t}" font-size="10">to private</text><line x1="235" y1="{l}" x2="235" y2="{b}" stroke="#9ca3af"/><text x="240" y="{t}" font-size="10">to shared</text><line x1="300" y1="{l}" x2="300" y2="{b}" stroke="#d62728"/><text x="305" y="{t}" font-size="10">refused</text><line x1="355" y1="{l}" x2="355" y2="{b}" stroke="#f59e0b"/><text x="360" y="{t}" font-size="10">punch-hole</text>"##,
        shade(0.0),
        shade(1.0),
        l = y,
        t = y + 9.0,
        b = y + 10.0
    );
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="24" font-size="15" font-weight="bold">{}</text>
{body}{legend}
</svg>
"#,
        y + 30.0,
        xml(title)
    )
}

/// Runs `gmem map`.
pub fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(&args.trace).map_err(|source| UsageError::Unreadable {
        flag: "TRACE",
        path: args.trace.clone(),
        source,
    })?;
    let files = parse_trace(&text);
    let title = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .unwrap_or("gmem exec trace")
        .to_string();
    std::fs::write(&args.output, render(&files, &title)).map_err(|source| {
        UsageError::Unwritable {
            flag: "--output",
            path: args.output.clone(),
            source,
        }
    })?;
    let changes: usize = files.iter().map(|f| f.events.len()).sum();
    println!(
        "{}: {} guest_memfd(s), {changes} changes",
        args.output.display(),
        files.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "# gmem exec -- ./vmm
1 1 ioctl(3, KVM_CREATE_VM, 1) -> 4 (vm1, kernel type 0, emulated protected)
1 1 ioctl(vm1, KVM_CREATE_GUEST_MEMFD, size=0x4000 flags=mmap|init_shared) -> 11 (guard revocation)
1 1 ioctl(vm1, KVM_SET_USER_MEMORY_REGION2, slot=0x0 gpa=0x100000 size=0x4000 gmem fd=11 offset=0x0) -> 0 (plain slot over the guest view at 0x7f00)
1 1 ioctl(11, KVM_SET_MEMORY_ATTRIBUTES2, offset=0x1000 size=0x1000 attributes=0x8) -> 0
1 1 dup(11) -> 12
1 1 ioctl(12, KVM_SET_MEMORY_ATTRIBUTES2, offset=0x0 size=0x4000 attributes=0x8) -> -1 EAGAIN error_offset=0x2000
1 1 fallocate(12, 0x3, 0x2000, 0x1000) -> 0
1 1 close(11) guest_memfd -> 0
1 1 ioctl(11, KVM_SET_MEMORY_ATTRIBUTES2, offset=0x0 size=0x1000 attributes=0x0) -> 0
";

    /// The trace's file, memslot and changes are found, through `dup` and `close`.
    #[test]
    fn a_trace_gives_files_memslots_and_changes() {
        let files = parse_trace(TRACE);
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert_eq!((f.size, f.init_private), (0x4000, false));
        assert_eq!(
            f.memslots,
            vec![Binding {
                slot: 0,
                gpa: 0x10_0000,
                size: 0x4000,
                offset: 0
            }]
        );
        assert_eq!(
            f.events,
            vec![
                Event::Convert {
                    offset: 0x1000,
                    size: 0x1000,
                    private: true,
                    failed: None,
                    at: None
                },
                Event::Convert {
                    offset: 0,
                    size: 0x4000,
                    private: true,
                    failed: Some("EAGAIN".into()),
                    at: None
                },
                Event::Punch {
                    offset: 0x2000,
                    size: 0x1000
                },
            ]
        );
    }

    /// The picture shades a private page and marks a refused conversion.
    #[test]
    fn the_map_shows_private_pages_and_refusals() {
        let svg = render(&parse_trace(TRACE), "t");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains(&shade(1.0)), "a fully private row");
        assert!(svg.contains("#d62728"), "the refused conversion");
        assert!(svg.contains("slot 0x0: GPA 0x100000–0x104000"));
    }
}
