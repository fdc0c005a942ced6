//! What the `ferry run` process keeps resident: letting go of the code only its start needed.
//!
//! A process's RSS counts every page of its executable and libraries that it has touched, and
//! the kernel maps code in around each page fault (64 KiB at a time). Start-up runs code that a
//! running sidecar never runs again — the command line, the config and its JSON schema, the
//! topic checks, the TLS set-up — and those pages would stay counted for the life of the pod,
//! about a quarter of ferry's RSS. So once ferry has run for [`RELEASE_AFTER`], `ferry run`
//! drops its mappings of code and read-only data. The pages stay in the kernel's page cache;
//! the code still in use is mapped again at its next use (a minor fault), and only that stays
//! counted.

use std::time::Duration;

/// How long after the start `ferry run` lets go of its start-up code: past the start itself,
/// the first group join and the first records.
pub const RELEASE_AFTER: Duration = Duration::from_secs(5);

/// What [`release_startup_code`] let go of.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings dropped.
    pub mappings: usize,
    /// Their resident size before, in KiB.
    pub resident_kib: u64,
}

/// Drops this process's mappings of files' code and read-only data (the executable's and its
/// libraries'), leaving the page cache alone. Only mappings that hold no private copy of a page
/// are touched: such a copy (read-only data relocated at start, or a debugger's breakpoint)
/// exists nowhere else, and dropping it would put the file's bytes in its place.
pub fn release_startup_code() -> std::io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for m in droppable(&smaps) {
        // SAFETY: the range is a whole mapping of this process, read from the kernel's own list:
        // a private, read-only mapping of a file, with no anonymous page in it, so every page
        // is the file's clean page-cache page. Those the kernel may itself drop at any time
        // under memory pressure; MADV_DONTNEED does just that, and the next access maps the
        // same bytes back.
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
        if rc == 0 {
            released.mappings += 1;
            released.resident_kib += m.resident_kib;
        }
    }
    Ok(released)
}

/// One mapping that may be dropped.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    len: usize,
    resident_kib: u64,
}

/// The read-only or executable private mappings of files without an anonymous page, from the
/// text of `/proc/self/smaps`.
fn droppable(smaps: &str) -> Vec<Mapping> {
    let mut found = Vec::new();
    // The mapping being read, if it qualifies so far, with its resident and anonymous KiB.
    let mut current: Option<(Mapping, Option<u64>)> = None;
    let mut finish = |current: Option<(Mapping, Option<u64>)>| {
        if let Some((m, Some(0))) = current {
            found.push(m);
        }
    };
    for line in smaps.lines() {
        if let Some(header) = mapping_header(line) {
            finish(current.take());
            // A file's path; not `[heap]`, `[stack]`, `[vdso]` or an anonymous mapping.
            let file = header.path.starts_with('/');
            if file && (header.perms == "r-xp" || header.perms == "r--p") {
                current = header.range.map(|(start, end)| {
                    let m = Mapping {
                        start,
                        len: end - start,
                        resident_kib: 0,
                    };
                    (m, None)
                });
            }
            continue;
        }
        let Some((m, anonymous)) = current.as_mut() else {
            continue;
        };
        let mut field = line.split_whitespace();
        let kib = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
        match field.next() {
            Some("Rss:") => m.resident_kib = kib(field.next()).unwrap_or(0),
            Some("Anonymous:") => *anonymous = kib(field.next()),
            _ => {}
        }
    }
    finish(current);
    found
}

/// A mapping's header line in smaps: `start-end perms offset dev inode [path]`.
struct Header<'a> {
    /// `None` when the addresses do not parse.
    range: Option<(usize, usize)>,
    perms: &'a str,
    path: &'a str,
}

/// The header in `line`; `None` for the field lines under a header.
fn mapping_header(line: &str) -> Option<Header<'_>> {
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let perms = parts.next()?;
    if perms.len() != 4 {
        return None;
    }
    let range = usize::from_str_radix(start, 16)
        .ok()
        .zip(usize::from_str_radix(end, 16).ok())
        .filter(|(s, e)| s < e);
    Some(Header {
        range,
        perms,
        path: parts.nth(3).map_or("", str::trim),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 42                         /usr/bin/ferry
Size:               1024 kB
Rss:                 400 kB
Anonymous:             0 kB
55d0a0100000-55d0a0300000 r-xp 00100000 fd:01 42                         /usr/bin/ferry
Size:               2048 kB
Rss:                1200 kB
Anonymous:             0 kB
55d0a0300000-55d0a0340000 r--p 00300000 fd:01 42                         /usr/bin/ferry
Size:                256 kB
Rss:                 256 kB
Anonymous:           252 kB
55d0a0340000-55d0a0344000 rw-p 00340000 fd:01 42                         /usr/bin/ferry
Size:                 16 kB
Rss:                  16 kB
Anonymous:            16 kB
55d0a1000000-55d0a1100000 rw-p 00000000 00:00 0                          [heap]
Rss:                 900 kB
Anonymous:           900 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 77                         /usr/lib/libc.so.6
Rss:                 800 kB
Anonymous:             0 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  92 kB
Anonymous:            92 kB
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn only_unwritten_code_and_read_only_data_of_files_are_dropped() {
        let found = droppable(SMAPS);
        assert_eq!(
            found,
            vec![
                Mapping {
                    start: 0x55d0a0000000,
                    len: 0x100000,
                    resident_kib: 400
                },
                Mapping {
                    start: 0x55d0a0100000,
                    len: 0x200000,
                    resident_kib: 1200
                },
                Mapping {
                    start: 0x7f0000000000,
                    len: 0x100000,
                    resident_kib: 800
                },
            ],
            "the executable's and the library's, not the relocated read-only data (anonymous \
             pages), the writable data, the heap, the stack or the vDSO"
        );
    }

    #[test]
    fn a_mapping_whose_anonymous_size_is_unknown_is_kept() {
        let text = "55d0a0100000-55d0a0300000 r-xp 00100000 fd:01 42 /usr/bin/ferry\nRss: 12 kB\n";
        assert!(droppable(text).is_empty());
    }

    #[test]
    fn releasing_keeps_the_process_running_its_code() {
        let released = release_startup_code().expect("smaps readable");
        assert!(released.mappings > 0, "{released:?}");
        // Code dropped a moment ago runs again, mapped back from the page cache.
        let text = format!("{:?}", droppable(SMAPS));
        assert!(text.contains("Mapping"));
    }
}
