//! A tiny x86-64 code emitter for freestanding test guests: the handful of instructions the
//! VMM's tests and benchmarks need (port and MMIO accesses, loads and stores, compares, short
//! jumps), encoded by hand. Guests run in 64-bit mode with the identity map the VMM builds.

/// A general-purpose 64-bit register (encoding number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    /// rax
    Rax = 0,
    /// rcx
    Rcx = 1,
    /// rdx
    Rdx = 2,
    /// rbx
    Rbx = 3,
    /// rsi
    Rsi = 6,
    /// rdi
    Rdi = 7,
}

/// Guest code under construction.
#[derive(Debug, Clone, Default)]
pub struct Asm {
    code: Vec<u8>,
}

/// A position in the code, for jumps back to it.
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

impl Asm {
    /// Empty code.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes.
    #[must_use]
    pub fn finish(self) -> Vec<u8> {
        self.code
    }

    /// The current position.
    #[must_use]
    pub fn label(&self) -> Label {
        Label(self.code.len())
    }

    /// `mov reg, imm64`.
    pub fn mov_imm(&mut self, reg: Reg, imm: u64) -> &mut Self {
        self.code.extend([0x48, 0xb8 + reg as u8]);
        self.code.extend(imm.to_le_bytes());
        self
    }

    /// `out dx, al` after loading `port` and `value`.
    pub fn outb(&mut self, port: u16, value: u8) -> &mut Self {
        self.code.extend([0x66, 0xba]);
        self.code.extend(port.to_le_bytes());
        self.code.extend([0xb0, value, 0xee]);
        self
    }

    /// `in al, dx` from `port`.
    pub fn inb(&mut self, port: u16) -> &mut Self {
        self.code.extend([0x66, 0xba]);
        self.code.extend(port.to_le_bytes());
        self.code.push(0xec);
        self
    }

    /// Writes `text` to the serial port.
    pub fn print(&mut self, port: u16, text: &str) -> &mut Self {
        for b in text.bytes() {
            self.outb(port, b);
        }
        self
    }

    /// `mov dword [addr], value` (through rdi/eax).
    pub fn store32(&mut self, addr: u64, value: u32) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.push(0xb8);
        self.code.extend(value.to_le_bytes());
        self.code.extend([0x89, 0x07]);
        self
    }

    /// `mov word [addr], value` (through rdi/ax).
    pub fn store16(&mut self, addr: u64, value: u16) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x66, 0xb8]);
        self.code.extend(value.to_le_bytes());
        self.code.extend([0x66, 0x89, 0x07]);
        self
    }

    /// `mov eax, dword [addr]` (through rdi).
    pub fn load32(&mut self, addr: u64) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x8b, 0x07]);
        self
    }

    /// `movzx eax, word [addr]` (through rdi).
    pub fn load16(&mut self, addr: u64) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x0f, 0xb7, 0x07]);
        self
    }

    /// `mov dword [addr], eax` (through rdi): saves what the guest saw for the host to check.
    pub fn store_eax(&mut self, addr: u64) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x89, 0x07]);
        self
    }

    /// `cmp eax, imm32`.
    pub fn cmp_eax(&mut self, imm: u32) -> &mut Self {
        self.code.push(0x3d);
        self.code.extend(imm.to_le_bytes());
        self
    }

    fn rel8(&self, target: Label, insn_len: usize) -> u8 {
        let next = self.code.len() + insn_len;
        let delta = i64::try_from(target.0).expect("small") - i64::try_from(next).expect("small");
        let d = i8::try_from(delta).expect("short jump target within 128 bytes");
        d.to_le_bytes()[0]
    }

    /// `jb target` (unsigned below).
    pub fn jb(&mut self, target: Label) -> &mut Self {
        let d = self.rel8(target, 2);
        self.code.extend([0x72, d]);
        self
    }

    /// `jne target`.
    pub fn jne(&mut self, target: Label) -> &mut Self {
        let d = self.rel8(target, 2);
        self.code.extend([0x75, d]);
        self
    }

    /// `jmp target`.
    pub fn jmp(&mut self, target: Label) -> &mut Self {
        let d = self.rel8(target, 2);
        self.code.extend([0xeb, d]);
        self
    }

    /// `mov ecx, imm32`.
    pub fn mov_ecx(&mut self, imm: u32) -> &mut Self {
        self.code.push(0xb9);
        self.code.extend(imm.to_le_bytes());
        self
    }

    /// `mov ebx, imm32`.
    pub fn mov_ebx(&mut self, imm: u32) -> &mut Self {
        self.code.push(0xbb);
        self.code.extend(imm.to_le_bytes());
        self
    }

    /// `mov edx, imm32`.
    pub fn mov_edx(&mut self, imm: u32) -> &mut Self {
        self.code.push(0xba);
        self.code.extend(imm.to_le_bytes());
        self
    }

    /// `mov word [addr], bx` (through rdi).
    pub fn store_bx(&mut self, addr: u64) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x66, 0x89, 0x1f]);
        self
    }

    /// `mov word [addr], dx` (through rdi).
    pub fn store_dx(&mut self, addr: u64) -> &mut Self {
        self.mov_imm(Reg::Rdi, addr);
        self.code.extend([0x66, 0x89, 0x17]);
        self
    }

    /// `cmp eax, ecx`.
    pub fn cmp_eax_ecx(&mut self) -> &mut Self {
        self.code.extend([0x39, 0xc8]);
        self
    }

    /// `inc ebx`.
    pub fn inc_ebx(&mut self) -> &mut Self {
        self.code.extend([0xff, 0xc3]);
        self
    }

    /// `inc edx`.
    pub fn inc_edx(&mut self) -> &mut Self {
        self.code.extend([0xff, 0xc2]);
        self
    }

    /// `inc ecx`.
    pub fn inc_ecx(&mut self) -> &mut Self {
        self.code.extend([0xff, 0xc1]);
        self
    }

    /// `cmp ecx, imm32`.
    pub fn cmp_ecx(&mut self, imm: u32) -> &mut Self {
        self.code.extend([0x81, 0xf9]);
        self.code.extend(imm.to_le_bytes());
        self
    }

    /// `pause`.
    pub fn pause(&mut self) -> &mut Self {
        self.code.extend([0xf3, 0x90]);
        self
    }

    /// Spins forever (`jmp $`).
    pub fn spin(&mut self) -> &mut Self {
        self.code.extend([0xeb, 0xfe]);
        self
    }

    /// `cli; hlt`.
    pub fn cli_hlt(&mut self) -> &mut Self {
        self.code.extend([0xfa, 0xf4]);
        self
    }

    /// Resets the machine through the i8042 (`outb 0xfe, 0x64`), then spins in case it returns.
    pub fn reset(&mut self) -> &mut Self {
        self.outb(0x64, 0xfe);
        self.spin()
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend(b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_instructions() {
        let mut a = Asm::new();
        a.outb(0x3f8, b'A');
        assert_eq!(
            a.clone().finish(),
            [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee]
        );
        let top = a.label();
        a.pause().jmp(top);
        let code = a.finish();
        // jmp back over pause (2 bytes) and itself (2 bytes).
        assert_eq!(&code[code.len() - 2..], &[0xeb, 0xfc]);
    }
}
