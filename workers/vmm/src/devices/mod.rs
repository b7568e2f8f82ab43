//! Legacy devices on the port-I/O bus: the 16550 serial console and the i8042 controller.
//!
//! Both are driven from the vCPU thread (port exits); the serial's interrupt goes to the guest
//! through an irqfd, so no device thread is involved.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_PORT_BASE};

/// Bytes of console output kept (the tail; older output is dropped).
pub const CONSOLE_LOG_BYTES: usize = 256 * 1024;

/// The guest's serial output: a bounded buffer keeping the last [`CONSOLE_LOG_BYTES`] bytes,
/// shared between the vCPU thread (writer) and the host (readers).
#[derive(Debug, Clone, Default)]
pub struct ConsoleLog {
    inner: Arc<Mutex<ConsoleInner>>,
}

#[derive(Debug, Default)]
struct ConsoleInner {
    bytes: VecDeque<u8>,
    dropped: u64,
    echo: bool,
    line: Vec<u8>,
}

impl ConsoleLog {
    /// An empty log; with `echo`, complete lines also go to `tracing` (target `guest`).
    #[must_use]
    pub fn new(echo: bool) -> Self {
        let log = Self::default();
        log.lock().echo = echo;
        log
    }

    fn lock(&self) -> MutexGuard<'_, ConsoleInner> {
        // A panic while holding this lock leaves only bytes behind; keep using them.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the guest wrote so far (the kept tail), lossily decoded.
    #[must_use]
    pub fn text(&self) -> String {
        let inner = self.lock();
        let (a, b) = inner.bytes.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Bytes dropped from the front because the log was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn push(&self, data: &[u8]) {
        let mut inner = self.lock();
        for &b in data {
            if inner.bytes.len() == CONSOLE_LOG_BYTES {
                inner.bytes.pop_front();
                inner.dropped += 1;
            }
            inner.bytes.push_back(b);
            if inner.echo {
                if b == b'\n' {
                    let line = std::mem::take(&mut inner.line);
                    tracing::info!(target: "guest", "{}", String::from_utf8_lossy(&line).trim_end());
                } else if inner.line.len() < 4096 {
                    inner.line.push(b);
                }
            }
        }
    }
}

/// The serial's output sink.
#[derive(Debug)]
pub struct ConsoleWriter(ConsoleLog);

impl io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An interrupt line driven through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Set when the guest asks the i8042 to reset the CPU.
#[derive(Debug, Clone, Default)]
pub struct ResetFlag(Arc<AtomicBool>);

impl ResetFlag {
    /// Whether a reset was requested.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Trigger for ResetFlag {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The port-I/O devices of one VM.
pub struct LegacyDevices {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
    i8042: I8042Device<ResetFlag>,
    reset: ResetFlag,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices").finish_non_exhaustive()
    }
}

impl LegacyDevices {
    /// A serial port writing into `console` and raising `serial_irq`, and an i8042.
    #[must_use]
    pub fn new(console: ConsoleLog, serial_irq: EventFd) -> Self {
        let reset = ResetFlag::default();
        Self {
            serial: Serial::new(IrqTrigger(serial_irq), ConsoleWriter(console)),
            i8042: I8042Device::new(reset.clone()),
            reset,
        }
    }

    /// Whether the guest requested a reset through the i8042.
    #[must_use]
    pub fn reset_requested(&self) -> bool {
        self.reset.is_set()
    }

    /// A port read; ports nobody owns read as all ones.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) && data.len() == 1 => {
                self.serial.read(offset(p, SERIAL_PORT_BASE))
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                self.i8042.read(offset(port, I8042_DATA_PORT))
            }
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// A port write; writes to ports nobody owns are ignored.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        let [value] = data else { return };
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                if let Err(e) = self.serial.write(offset(p, SERIAL_PORT_BASE), *value) {
                    tracing::debug!(error = %e, "serial write");
                }
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                let _ = self.i8042.write(offset(port, I8042_DATA_PORT), *value);
            }
            _ => {}
        }
    }
}

fn offset(port: u16, base: u16) -> u8 {
    u8::try_from(port - base).expect("callers check the port range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (LegacyDevices, ConsoleLog) {
        let log = ConsoleLog::new(false);
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        (LegacyDevices::new(log.clone(), evt), log)
    }

    #[test]
    fn serial_output_reaches_the_console_log() {
        let (mut d, log) = devices();
        for b in b"hi\n" {
            d.pio_write(SERIAL_PORT_BASE, &[*b]);
        }
        assert_eq!(log.text(), "hi\n");
    }

    #[test]
    fn i8042_reset_command_sets_the_flag_and_other_writes_do_not() {
        let (mut d, _) = devices();
        d.pio_write(I8042_COMMAND_PORT, &[0xaa]);
        assert!(!d.reset_requested());
        d.pio_write(I8042_COMMAND_PORT, &[0xfe]);
        assert!(d.reset_requested());
    }

    #[test]
    fn unowned_ports_read_all_ones() {
        let (mut d, _) = devices();
        let mut data = [0u8; 2];
        d.pio_read(0x80, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn console_log_keeps_the_tail() {
        let log = ConsoleLog::new(false);
        log.push(&vec![b'a'; CONSOLE_LOG_BYTES]);
        log.push(b"zz");
        assert_eq!(log.dropped(), 2);
        assert!(log.text().ends_with("azz"));
    }
}
