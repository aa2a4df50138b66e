//! The monitor's own memory. There is one monitor per container, so every
//! page it keeps is paid for hundreds of times on a node; the target is well
//! under 1 MiB of PSS per monitor while it streams logs.
//!
//! Creating the container takes far more than supervising it: serde parses
//! the OCI spec (deep recursion, large frames), the executor plans and forks,
//! and both run code and read tables of this binary that the poll loop never
//! needs again; starting it (a control request, the executor's release) is
//! much the same. Once the container is created and reported, and again once
//! it started, [`release_setup`] gives back what that left behind:
//!
//! - the binary's clean pages: code, constants, vtables. They are pages of
//!   the page cache, so dropping them from our page tables loses nothing: the
//!   few the loop uses are faulted in again from the same (still mapped, so
//!   still the same) file. It stops counting the setup's code against every
//!   monitor, in its PSS and its page tables. A page the process wrote (the
//!   GOT, `.data`, a debugger's breakpoint) is a private copy, not the file's,
//!   and is kept: `/proc/self/pagemap` tells them apart page by page;
//! - free heap pages (`malloc_trim`);
//! - the main stack below the caller's frame, which only setup reached.
//!
//! The daemon uses the same means from several threads ([`release_idle`]):
//! there a page of a writable segment could be written by another thread
//! between the check and the drop, so only the read-only segments (code,
//! constants, and the relocated tables that are read-only once the loader
//! is done) are released.
//!
//! Before changing it: nothing here may drop a page that is not the file's
//! own (a refault would bring back the file's bytes, not ours) or memory that
//! is in use; the stack is released strictly below the caller's frame.

use std::ffi::c_void;
use std::ptr::NonNull;

use nix::sys::mman::{MmapAdvise, madvise};

/// Above this size glibc serves an allocation with its own mapping and
/// unmaps it when it is freed: attach queues and the log's retry buffer
/// grow this big only in bursts, and must not stay in the heap after.
/// Setting it also stops glibc from raising the threshold on its own.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// Free memory at the top of the heap beyond this is returned at once, all
/// of it (no padding is kept for growth): the monitor's heap barely changes
/// once it supervises, so that costs a `brk` now and then at most.
const TRIM_THRESHOLD: i32 = 32 * 1024;
const TOP_PAD: i32 = 0;

/// The stack kept below the caller's frame when the rest is released: room
/// for the frames of the release itself (a few hundred bytes), with a wide
/// margin.
const STACK_MARGIN: usize = 4 * 1024;

/// glibc gives each thread that finds the arenas busy an arena of its own,
/// up to 8 per core, and memory freed in one arena never serves another:
/// the daemon's runtime workers and blocking threads each kept a partly
/// used arena. Two arenas let the two runtime workers allocate side by side;
/// the blocking threads share them.
const DAEMON_ARENA_MAX: i32 = 2;

/// Sets glibc's malloc up for the monitor: a small, long-lived,
/// single-threaded process. Call before anything big is allocated.
#[allow(unsafe_code)] // mallopt(3)
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc's parameters; the monitor is single-
    // threaded, so no allocation runs concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}

/// Sets glibc's malloc up for the daemon. Call before any other thread is
/// started. Unlike the monitor's, the thresholds stay glibc's own: image
/// pulls allocate and free large buffers all the time, and a fixed mmap
/// threshold would map and unmap (and zero) them each time.
#[allow(unsafe_code)] // mallopt(3)
pub fn tune_daemon_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc's parameters; the caller runs before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, DAEMON_ARENA_MAX);
    }
}

/// Sets glibc's malloc up for `berth bench`, a CRI client: it keeps what
/// it frees. By default a freed large buffer goes back to the kernel (it
/// was mmapped, or it trims the heap's top), so each list answer at 1000
/// containers (~0.4 MB, and its decoding) cost the client ~100 fresh page
/// faults, ~0.1 ms in every list timing whatever the endpoint
/// (docs/performance.md, session 7). kubelet's Go heap keeps freed memory
/// between relists too. Call before any other thread is started.
#[allow(unsafe_code)] // mallopt(3)
pub fn tune_bench_allocator() {
    // Buffers up to 32 MiB (glibc's largest mmap threshold) come from the
    // heap, whose top is kept up to 256 MiB.
    const MMAP_THRESHOLD: i32 = 32 << 20;
    const TRIM_THRESHOLD: i32 = 256 << 20;
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc's parameters; the caller runs before
    // any other thread exists. A refused value (0) leaves glibc's default,
    // which only costs speed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Gives back what creating or starting the container left behind (see the
/// module doc). Call on the main thread, from the frame that runs the
/// supervisor's loop, between its turns: what its callees used is released.
/// Single-threaded processes only.
#[inline(never)]
pub fn release_setup() {
    // In this order: finding the stack runs code (reading /proc/self/maps)
    // that the binary's release then drops again, and both free memory
    // that the trim returns.
    release_stack_below_here();
    release_clean_binary_pages(Segments::All);
    release_clean_library_pages();
    trim_heap();
}

/// The daemon's release, safe while other threads run: the binary's clean
/// pages of its read-only segments, free heap pages of every arena, and,
/// when called on the main thread, its stack below the caller's frame.
/// What the threads still use is faulted in again from the page cache.
#[inline(never)]
pub fn release_idle() {
    release_stack_below_here();
    release_clean_binary_pages(Segments::ReadOnly);
    trim_heap();
}

#[allow(unsafe_code)] // malloc_trim(3)
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; it takes
    // each arena's lock, as malloc and free do, so other threads may
    // allocate meanwhile.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as usize,
        _ => 4096,
    }
}

/// Drops the pages of `[start, end)` from this process (rounded inwards to
/// whole pages). The caller guarantees that the range holds nothing that is
/// in use or that a refault could not give back.
#[allow(unsafe_code)] // madvise(2)
fn dont_need(start: usize, end: usize, page: usize) {
    let start = start.next_multiple_of(page);
    let end = end - end % page;
    if end <= start {
        return;
    }
    let Some(addr) = NonNull::new(start as *mut c_void) else {
        return;
    };
    // SAFETY: the caller guarantees what the range holds (see above):
    // MADV_DONTNEED on it only makes the kernel fault its pages in afresh
    // (zeroes for the dead stack, the file's bytes for the file's pages).
    if let Err(errno) = unsafe { madvise(addr, end - start, MmapAdvise::MADV_DONTNEED) } {
        tracing::debug!(%errno, start, end, "madvise(MADV_DONTNEED)");
    }
}

/// Releases the main thread's stack below this function's frame (minus a
/// margin): what remains there are dead frames of the setup. Does nothing
/// on any other thread's stack.
#[inline(never)]
fn release_stack_below_here() {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let Some((low, high)) = main_stack() else {
        return;
    };
    if (low..high).contains(&here) {
        dont_need(low, here.saturating_sub(STACK_MARGIN), page_size());
    }
}

/// The main thread's stack mapping.
fn main_stack() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    parse_range(line)
}

/// `start-end` at the head of a `/proc/<pid>/maps` line.
fn parse_range(line: &str) -> Option<(usize, usize)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

/// `/proc/<pid>/pagemap` entry bits: the page is in memory, and it is a
/// page of the mapped file (or shared memory), not a private copy.
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// Which of the binary's pages a release may look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segments {
    /// Every loadable segment: only for a single-threaded process, where
    /// nothing can write a page between its check and its drop.
    All,
    /// The segments no thread can write: those loaded without write
    /// permission, and the part of the writable one that the loader made
    /// read-only after relocating it (`PT_GNU_RELRO`).
    ReadOnly,
}

/// Drops the pages of the main executable's segments that are the file's
/// own and in memory (see the module doc).
fn release_clean_binary_pages(which: Segments) {
    release_clean_pages(&loaded_segments(Objects::MainProgram), which);
}

/// The same for the shared libraries' read-only segments (libc, libm,
/// ld.so). Their pages stay in the page cache for every other process that
/// maps them, so this frees little memory: it takes them out of the
/// monitor's own mappings (its RSS and page tables), where the kernel's
/// fault-around had put 64 KiB around every function the setup called;
/// the loop then maps again the few it calls.
fn release_clean_library_pages() {
    release_clean_pages(&loaded_segments(Objects::Libraries), Segments::ReadOnly);
}

fn release_clean_pages(segments: &[Segment], which: Segments) {
    let page = page_size();
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return;
    };
    for (start, end) in releasable_ranges(segments, which, page) {
        for (run_start, run_end) in clean_runs(&pagemap, start, end, page) {
            dont_need(run_start, run_end, page);
        }
    }
}

/// The page-aligned ranges of `segments` that `which` allows. A writable
/// segment is rounded outwards (its pages are checked one by one anyway);
/// a read-only range inwards, so that a page it shares with a writable
/// neighbour is never dropped.
fn releasable_ranges(segments: &[Segment], which: Segments, page: usize) -> Vec<(usize, usize)> {
    segments
        .iter()
        .filter_map(|segment| match (which, segment.kind) {
            (Segments::All, SegmentKind::Load { .. }) => Some((
                segment.start - segment.start % page,
                segment.end.next_multiple_of(page),
            )),
            (Segments::ReadOnly, SegmentKind::Load { writable: false })
            | (Segments::ReadOnly, SegmentKind::Relro) => Some((
                segment.start.next_multiple_of(page),
                segment.end - segment.end % page,
            )),
            _ => None,
        })
        .filter(|(start, end)| start < end)
        .collect()
}

/// The runs of pages in `[start, end)` (page-aligned) that pagemap shows in
/// memory and backed by the file. Empty if pagemap cannot be read.
fn clean_runs(
    pagemap: &std::fs::File,
    start: usize,
    end: usize,
    page: usize,
) -> Vec<(usize, usize)> {
    use std::os::unix::fs::FileExt;

    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut entries = vec![0u8; 8 * 512];
    let mut addr = start;
    while addr < end {
        let count = ((end - addr) / page).min(512);
        let buf = &mut entries[..8 * count];
        let Ok(()) = pagemap.read_exact_at(buf, (addr / page * 8) as u64) else {
            return Vec::new();
        };
        for entry in buf.chunks_exact(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(entry);
            let bits = u64::from_ne_bytes(bytes);
            if bits & PM_PRESENT != 0 && bits & PM_FILE != 0 {
                match runs.last_mut() {
                    Some((_, run_end)) if *run_end == addr => *run_end += page,
                    _ => runs.push((addr, addr + page)),
                }
            }
            addr += page;
        }
    }
    runs
}

/// One of the main executable's program headers that the release cares
/// about, as an address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    start: usize,
    end: usize,
    kind: SegmentKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentKind {
    /// `PT_LOAD`: mapped from the file.
    Load { writable: bool },
    /// `PT_GNU_RELRO`: read-only once the loader has relocated it.
    Relro,
}

/// Whose segments [`loaded_segments`] collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Objects {
    /// The executable only.
    MainProgram,
    /// Every shared library mapped from a file, not the executable nor the
    /// vDSO (the kernel's, not a file's).
    Libraries,
}

struct Collector {
    objects: Objects,
    seen_main: bool,
    segments: Vec<Segment>,
}

/// The loadable segments and RELRO ranges of `objects`.
#[allow(unsafe_code)] // dl_iterate_phdr(3)
fn loaded_segments(objects: Objects) -> Vec<Segment> {
    let mut collector = Collector {
        objects,
        seen_main: false,
        segments: Vec::new(),
    };
    // SAFETY: the callback only reads the program headers it is given for
    // the duration of the call, and writes only to the collector, which
    // outlives the call. dl_iterate_phdr documents the first object as the
    // main program.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect_segments),
            (&raw mut collector).cast::<c_void>(),
        );
    }
    collector.segments
}

/// `dl_iterate_phdr` callback: adds the segments of the object to the
/// `Collector` behind `data` if it is one of those it collects; stops
/// after the main program when only that one is wanted.
#[allow(unsafe_code)]
unsafe extern "C" fn collect_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid info for the duration of the
    // call, and `data` is the Collector that `loaded_segments` passed.
    let (info, collector) = unsafe { (&*info, &mut *data.cast::<Collector>()) };
    let main = !std::mem::replace(&mut collector.seen_main, true);
    let wanted = match collector.objects {
        Objects::MainProgram => main,
        Objects::Libraries => {
            // SAFETY: dlpi_name is null or a NUL-terminated string that
            // lives as long as the object is loaded.
            let name = (!info.dlpi_name.is_null())
                .then(|| unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes());
            // Only objects loaded from a file have an absolute path; the
            // vDSO's name is not one.
            !main && name.is_some_and(|name| name.starts_with(b"/"))
        }
    };
    if wanted && !info.dlpi_phdr.is_null() {
        // SAFETY: dlpi_phdr points to dlpi_phnum program headers.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        for header in headers {
            let kind = match header.p_type {
                libc::PT_LOAD => SegmentKind::Load {
                    writable: header.p_flags & libc::PF_W != 0,
                },
                libc::PT_GNU_RELRO => SegmentKind::Relro,
                _ => continue,
            };
            let start = info.dlpi_addr as usize + header.p_vaddr as usize;
            collector.segments.push(Segment {
                start,
                end: start + header.p_memsz as usize,
                kind,
            });
        }
    }
    match collector.objects {
        Objects::MainProgram => 1,
        Objects::Libraries => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_their_range() {
        assert_eq!(
            parse_range(
                "7ffda6040000-7ffda6061000 rw-p 00000000 00:00 0                          [stack]"
            ),
            Some((0x7ffd_a604_0000, 0x7ffd_a606_1000))
        );
        assert_eq!(parse_range("garbage"), None);
    }

    fn ranges(segments: &[Segment]) -> Vec<(usize, usize)> {
        segments
            .iter()
            .filter(|s| matches!(s.kind, SegmentKind::Load { .. }))
            .map(|s| (s.start - s.start % 4096, s.end.next_multiple_of(4096)))
            .collect()
    }

    #[test]
    fn code_is_found_and_written_pages_are_not_clean() {
        assert!(main_stack().is_some_and(|(low, high)| low < high));
        let segments = loaded_segments(Objects::MainProgram);
        let code = code_is_found_and_written_pages_are_not_clean as *const () as usize;
        assert!(
            segments
                .iter()
                .any(|s| s.kind == SegmentKind::Load { writable: false }
                    && (s.start..s.end).contains(&code)),
            "{segments:x?} {code:x}"
        );
        let page = page_size();
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let (start, end) = ranges(&segments)
            .into_iter()
            .find(|&(s, e)| (s..e).contains(&code))
            .unwrap();
        // The code running now is in memory and the file's own.
        let runs = clean_runs(&pagemap, start, end, page);
        assert!(
            runs.iter().any(|&(s, e)| (s..e).contains(&code)),
            "{runs:x?}"
        );
        // A page this process wrote is a private copy: never in a run.
        static mut WRITTEN: [u8; 8] = [1; 8];
        // SAFETY: only this test touches it.
        #[allow(unsafe_code)]
        let written = unsafe {
            WRITTEN[0] = 2;
            (&raw const WRITTEN) as usize
        };
        let data = ranges(&segments)
            .into_iter()
            .find(|&(s, e)| (s..e).contains(&written))
            .unwrap();
        let runs = clean_runs(&pagemap, data.0, data.1, page);
        assert!(
            !runs.iter().any(|&(s, e)| (s..e).contains(&written)),
            "{runs:x?}"
        );
        // And a multi-threaded release never even looks at it.
        assert!(
            !releasable_ranges(&segments, Segments::ReadOnly, page)
                .iter()
                .any(|&(s, e)| (s..e).contains(&written))
        );
    }

    #[test]
    fn libraries_are_found_without_the_program_or_the_vdso() {
        let libc_code = libc::getpid as *const () as usize;
        let own_code = page_size as *const () as usize;
        let libraries = loaded_segments(Objects::Libraries);
        assert!(
            libraries
                .iter()
                .any(|s| (s.start..s.end).contains(&libc_code)),
            "{libraries:x?} {libc_code:x}"
        );
        assert!(
            !libraries
                .iter()
                .any(|s| (s.start..s.end).contains(&own_code)),
            "{libraries:x?} {own_code:x}"
        );
        let vdso = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .find(|l| l.ends_with("[vdso]"))
            .and_then(parse_range);
        if let Some((vdso_start, vdso_end)) = vdso {
            assert!(
                !libraries
                    .iter()
                    .any(|s| s.start < vdso_end && vdso_start < s.end),
                "{libraries:x?} vdso {vdso_start:x}-{vdso_end:x}"
            );
        }
    }

    #[test]
    fn read_only_release_keeps_to_whole_pages_no_thread_can_write() {
        let load = |start, end, writable| Segment {
            start,
            end,
            kind: SegmentKind::Load { writable },
        };
        let segments = [
            load(0x20_0000, 0x20_2800, false),
            load(0x20_2800, 0x20_5000, false),
            // The writable segment starts with the RELRO part.
            load(0x20_6100, 0x20_9200, true),
            Segment {
                start: 0x20_6100,
                end: 0x20_8000,
                kind: SegmentKind::Relro,
            },
        ];
        assert_eq!(
            releasable_ranges(&segments, Segments::ReadOnly, 0x1000),
            [
                (0x20_0000, 0x20_2000),
                (0x20_3000, 0x20_5000),
                (0x20_7000, 0x20_8000)
            ]
        );
        assert_eq!(
            releasable_ranges(&segments, Segments::All, 0x1000),
            [
                (0x20_0000, 0x20_3000),
                (0x20_2000, 0x20_5000),
                (0x20_6000, 0x20_a000)
            ]
        );
    }
}
