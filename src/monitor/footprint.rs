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

/// Sets glibc's malloc up for a small, long-lived, single-threaded process.
/// Call before anything big is allocated.
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

/// Gives back what creating or starting the container left behind (see the
/// module doc). Call on the main thread, from the frame that runs the
/// supervisor's loop, between its turns: what its callees used is released.
#[inline(never)]
pub fn release_setup() {
    // In this order: finding the stack runs code (reading /proc/self/maps)
    // that the binary's release then drops again, and both free memory
    // that the trim returns.
    release_stack_below_here();
    release_clean_binary_pages();
    trim_heap();
}

#[allow(unsafe_code)] // malloc_trim(3)
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; no
    // allocation is in progress (single thread).
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

/// Drops the pages of the main executable's loadable segments that are the
/// file's own and in memory (see the module doc).
fn release_clean_binary_pages() {
    let page = page_size();
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return;
    };
    for (start, end) in main_program_segments() {
        let (start, end) = (start - start % page, end.next_multiple_of(page));
        for (run_start, run_end) in clean_runs(&pagemap, start, end, page) {
            dont_need(run_start, run_end, page);
        }
    }
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

/// The main executable's loadable segments, as address ranges.
#[allow(unsafe_code)] // dl_iterate_phdr(3)
fn main_program_segments() -> Vec<(usize, usize)> {
    let mut segments: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads the program headers it is given for
    // the duration of the call, and stops at the first object, which
    // dl_iterate_phdr documents as the main program.
    unsafe {
        libc::dl_iterate_phdr(Some(collect_segments), (&raw mut segments).cast::<c_void>());
    }
    segments
}

/// `dl_iterate_phdr` callback: collects the first object's (the main
/// program's) loadable segments into the `Vec<(usize, usize)>` behind
/// `data`, then stops the iteration.
#[allow(unsafe_code)]
unsafe extern "C" fn collect_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid info for the duration of the
    // call, and `data` is the Vec that `main_program_segments` passed.
    let (info, segments) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: dlpi_phdr points to dlpi_phnum program headers.
    let headers =
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    for header in headers.iter().filter(|h| h.p_type == libc::PT_LOAD) {
        let start = info.dlpi_addr as usize + header.p_vaddr as usize;
        segments.push((start, start + header.p_memsz as usize));
    }
    1
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

    #[test]
    fn code_is_found_and_written_pages_are_not_clean() {
        assert!(main_stack().is_some_and(|(low, high)| low < high));
        let segments = main_program_segments();
        let code = code_is_found_and_written_pages_are_not_clean as *const () as usize;
        assert!(
            segments.iter().any(|&(s, e)| (s..e).contains(&code)),
            "{segments:x?} {code:x}"
        );
        let page = page_size();
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let (start, end) = segments
            .iter()
            .map(|&(s, e)| (s - s % page, e.next_multiple_of(page)))
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
        let data = segments
            .iter()
            .map(|&(s, e)| (s - s % page, e.next_multiple_of(page)))
            .find(|&(s, e)| (s..e).contains(&written))
            .unwrap();
        let runs = clean_runs(&pagemap, data.0, data.1, page);
        assert!(
            !runs.iter().any(|&(s, e)| (s..e).contains(&written)),
            "{runs:x?}"
        );
    }
}
