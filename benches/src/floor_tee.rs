//! A zero-copy variant of the floor, to measure what splice(2) and tee(2) would save: the
//! sender's bytes are spliced into a kernel pipe, tee'd (page references, no copy) into
//! one pipe per receiver, and spliced from there into the receivers' sockets, so the
//! server process never copies a payload byte. Rounds of one block in lockstep: each
//! block reaches every receiver's pipe before the next is read; the receivers' sockets
//! drain under `poll(2)`. Linux only; n is bounded by the per-user pipe memory.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One kernel pipe: its read and write ends.
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and now owned only here.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a failure only leaves the default size.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        Ok(Pipe { rd, wr })
    }
}

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both descriptors are open for the call; null offsets mean "current position".
    check(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    })
}

fn tee(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are open pipe descriptors for the call.
    check(unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) })
}

fn poll(fds: &mut [libc::pollfd]) {
    // SAFETY: `fds` is a live, correctly sized array of pollfd for the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
}

/// Fans the sender out to the receivers with splice and tee; on any failure the
/// remaining receivers are cut (the load generator then reports them short).
pub fn fan_out(sender: TcpStream, receivers: Vec<TcpStream>, block: usize) {
    if let Err(e) = run(&sender, &receivers, block) {
        eprintln!("floor-server (tee): {e}");
    }
    for r in &receivers {
        let _ = r.shutdown(Shutdown::Both);
    }
    let _ = sender.shutdown(Shutdown::Both);
}

fn run(sender: &TcpStream, receivers: &[TcpStream], block: usize) -> io::Result<()> {
    let src = Pipe::new(block)?;
    let outs: Vec<Pipe> = receivers
        .iter()
        .map(|_| Pipe::new(block))
        .collect::<io::Result<_>>()?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    sender.set_nonblocking(true)?;
    for r in receivers {
        r.set_nonblocking(true)?;
    }
    // Bytes of the current round still in each receiver's pipe; None: that receiver failed.
    let mut left: Vec<Option<usize>> = vec![Some(0); receivers.len()];
    loop {
        // A round: one block from the sender, into every live receiver's pipe.
        let got = loop {
            match splice(sender.as_raw_fd(), src.wr.as_raw_fd(), block) {
                Ok(k) => break k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [libc::pollfd {
                        fd: sender.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    poll(&mut fds);
                }
                Err(e) => return Err(e),
            }
        };
        if got == 0 {
            return Ok(());
        }
        for (out, left) in outs.iter().zip(left.iter_mut()) {
            if left.is_some() {
                // The receiver's pipe is empty and as large as the block: all of it fits.
                *left = tee(src.rd.as_raw_fd(), out.wr.as_raw_fd(), got).ok();
            }
        }
        let mut gone = 0;
        while gone < got {
            gone += splice(src.rd.as_raw_fd(), null.as_raw_fd(), got - gone)?;
        }
        // Drain every receiver's pipe into its socket.
        loop {
            let mut waiting = Vec::new();
            for ((r, out), left) in receivers.iter().zip(&outs).zip(left.iter_mut()) {
                let Some(k) = left else { continue };
                while *k > 0 {
                    match splice(out.rd.as_raw_fd(), r.as_raw_fd(), *k) {
                        Ok(m) if m > 0 => *k -= m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        _ => {
                            *left = None;
                            break;
                        }
                    }
                }
                if left.is_some_and(|k| k > 0) {
                    waiting.push(libc::pollfd {
                        fd: r.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    });
                }
            }
            if waiting.is_empty() {
                break;
            }
            poll(&mut waiting);
        }
        if left.iter().all(Option::is_none) {
            return Ok(());
        }
    }
}
