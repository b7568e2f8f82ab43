#!/usr/bin/perl
# fn-probe: a hostile function that tries to get out of its sandbox and reports, for each attempt,
# what it got.
#
# It is a custom-runtime `bootstrap` (it speaks the Lambda Runtime API itself) written in Perl
# because most attempts are raw system calls (x32 numbers, clone with namespace flags, clone3,
# io_uring_setup, pidfd_getfd, fspick/fsconfig, mount_setattr) that safe Rust cannot make: the
# workspace forbids `unsafe` outside the VMM, and Perl's `syscall` makes any call a static binary
# could. It needs only perl-base (Essential on Debian), which the jail's read-only /usr provides.
#
# Each invocation runs every attempt, each in its own forked child so that a seccomp kill (SIGSYS)
# or a hang ends only that attempt, and returns a JSON array of
#   {"attempt": NAME, "escaped": BOOL, "got": TEXT, "errno": NAME-or-null}
# `escaped` is true when the attempt got what it asked for, or when it could not be tried (the
# text says "NOT TRIED"): a probe that cannot run must not pass.
#
# The event may set: tmp_cap_mb (the /tmp size the jail promises; default 512), fork_cap (most
# processes the fork bomb makes before it calls itself unbounded; default 1500), map_cap_mb (when
# set, also map address space up to this many MiB to find the memory bound).
use strict;
use warnings;
use Config;
use Errno ();
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Socket qw(SOCK_RAW);
use Fcntl qw(O_RDWR O_RDONLY);

my @SIGNAME = split ' ', $Config{sig_name};
my %ERRNAME;
for my $name (sort keys %!) {
    no strict 'refs';
    my $v = eval { &{"Errno::$name"}() };
    $ERRNAME{$v} //= $name if defined $v;
}

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
use constant {
    SYS_MMAP => 9, SYS_GETPID => 39, SYS_CLONE => 56, SYS_PTRACE => 101, SYS_STATFS => 137,
    SYS_IO_URING_SETUP => 425, SYS_FSCONFIG => 431, SYS_FSPICK => 433, SYS_PIDFD_OPEN => 434,
    SYS_CLONE3 => 435, SYS_PIDFD_GETFD => 438, SYS_MOUNT_SETATTR => 442,
    X32_SYSCALL_BIT => 0x40000000,
    CLONE_NEWUSER => 0x10000000, CLONE_NEWNET => 0x40000000, SIGCHLD => 17,
    AT_FDCWD => -100, PTRACE_SEIZE => 0x4206,
};

sub errname { my $n = shift; return $ERRNAME{$n} // "errno $n" }
sub errstr { my $n = shift; local $! = $n; return errname($n) . " ($!)" }

# (escaped, got, errno) for a failed call: refused, with the errno.
sub refused_by { my ($what, $n) = @_; return (0, "$what: " . errstr($n), errname($n)) }

sub js {
    my $s = shift;
    return 'null' unless defined $s;
    $s =~ s/(["\\])/\\$1/g;
    $s =~ s/([^\x20-\x7e])/sprintf("\\u%04x", ord $1)/ge;
    return "\"$s\"";
}

# Runs `code` in a child; returns {attempt, escaped, got, errno}.
sub attempt {
    my ($name, $timeout_s, $code) = @_;
    my %r = (attempt => $name);
    pipe(my $rd, my $wr) or return { %r, escaped => 1, got => "NOT TRIED: pipe: " . errstr($! + 0) };
    my $pid = fork;
    if (!defined $pid) {
        return { %r, escaped => 1, got => "NOT TRIED: fork: " . errstr($! + 0) };
    }
    if ($pid == 0) {
        close $rd;
        alarm $timeout_s;
        my @out = eval { $code->() };
        @out = (1, "NOT TRIED: probe error: $@", undef) if $@;
        my ($esc, $got, $err) = @out;
        syswrite $wr, join("\x1f", $esc ? 1 : 0, $got // '', $err // '');
        close $wr;
        POSIX::_exit(0);
    }
    close $wr;
    my $out = do { local $/; <$rd> } // '';
    close $rd;
    waitpid($pid, 0);
    my $status = $?;
    if (WIFSIGNALED($status) && $out eq '') {
        my $sig = WTERMSIG($status);
        my $signame = 'SIG' . ($SIGNAME[$sig] // $sig);
        if ($signame eq 'SIGSYS') {
            return { %r, escaped => 0, got => "killed by SIGSYS (seccomp)", errno => undef };
        }
        return { %r, escaped => 1, got => "NOT TRIED: the attempt died of $signame" };
    }
    my ($esc, $got, $err) = split /\x1f/, $out, 3;
    return { %r, escaped => 1, got => "NOT TRIED: no report (status $status)" } unless defined $got;
    return { %r, escaped => $esc ? 1 : 0, got => $got, errno => ($err eq '' ? undef : $err) };
}

sub status_field {
    my ($status, $name) = @_;
    return $status =~ /^\Q$name\E:[ \t]*(.*)$/m ? $1 : "?";
}

sub try_capabilities {
    open(my $fh, '<', '/proc/self/status') or return (1, "NOT TRIED: /proc/self/status: " . errstr($! + 0));
    my $s = do { local $/; <$fh> };
    my %f = map { $_ => status_field($s, $_) } qw(Uid Gid Groups CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs Seccomp Seccomp_filters);
    my ($uid) = split ' ', $f{Uid};
    my $any_cap = grep { $f{$_} !~ /^0+$/ } qw(CapInh CapPrm CapEff CapBnd CapAmb);
    my $esc = ($uid eq '0' || $any_cap || $f{NoNewPrivs} ne '1') ? 1 : 0;
    (my $groups = $f{Groups}) =~ s/\s+$//;
    return ($esc, "uid=$uid groups=[$groups] CapEff=$f{CapEff} CapPrm=$f{CapPrm} CapBnd=$f{CapBnd} "
        . "CapAmb=$f{CapAmb} CapInh=$f{CapInh} NoNewPrivs=$f{NoNewPrivs} Seccomp=$f{Seccomp} "
        . "filters=$f{Seccomp_filters}");
}

sub try_x32 {
    my $r = syscall(X32_SYSCALL_BIT | SYS_GETPID);
    return (1, "x32 getpid returned $r") if $r >= 0;
    my $e = $! + 0;
    # The kernel answers ENOSYS when it has no x32 ABI: the filter let the call through.
    return (1, "x32 getpid: " . errstr($e) . ": passed the filter (this kernel has no x32 ABI)", errname($e))
        if errname($e) eq 'ENOSYS';
    return refused_by("x32 getpid", $e);
}

sub try_io_uring {
    my $params = "\0" x 120;
    my $fd = syscall(SYS_IO_URING_SETUP, 1, $params);
    return (1, "io_uring_setup returned fd $fd") if $fd >= 0;
    return refused_by("io_uring_setup", $! + 0);
}

sub try_clone_newuser {
    my $r = syscall(SYS_CLONE, CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0);
    POSIX::_exit(0) if $r == 0;
    if ($r > 0) {
        waitpid($r, 0);
        return (1, "clone(CLONE_NEWUSER|CLONE_NEWNET) made child $r");
    }
    return refused_by("clone(CLONE_NEWUSER|CLONE_NEWNET)", $! + 0);
}

sub try_clone3 {
    my $args = pack('Q<8', CLONE_NEWUSER | CLONE_NEWNET, 0, 0, 0, SIGCHLD, 0, 0, 0);
    my $r = syscall(SYS_CLONE3, $args, length $args);
    POSIX::_exit(0) if $r == 0;
    if ($r > 0) {
        waitpid($r, 0);
        return (1, "clone3(CLONE_NEWUSER|CLONE_NEWNET) made child $r");
    }
    return refused_by("clone3(CLONE_NEWUSER|CLONE_NEWNET)", $! + 0);
}

sub try_pidfd_getfd {
    my $pidfd = syscall(SYS_PIDFD_OPEN, 1, 0);
    return refused_by("pidfd_open(1)", $! + 0) if $pidfd < 0;
    my $fd = syscall(SYS_PIDFD_GETFD, $pidfd, 0, 0);
    if ($fd >= 0) {
        my $what = readlink("/proc/self/fd/$fd") // '?';
        return (1, "took PID 1's fd 0: $what");
    }
    return refused_by("pidfd_getfd(PID 1, fd 0)", $! + 0);
}

sub try_proc_mem {
    return (1, "opened /proc/1/mem read-write") if sysopen(my $fh, '/proc/1/mem', O_RDWR);
    return refused_by("open /proc/1/mem O_RDWR", $! + 0);
}

sub try_ptrace {
    my $r = syscall(SYS_PTRACE, PTRACE_SEIZE, 1, 0, 0);
    # Exiting detaches.
    return (1, "PTRACE_SEIZE of PID 1 succeeded") if $r == 0;
    return refused_by("ptrace(PTRACE_SEIZE, 1)", $! + 0);
}

sub try_signal_agent {
    return (1, "kill(1, 0) succeeded: PID 1 accepts our signals") if kill 0, 1;
    return refused_by("kill(1, 0)", $! + 0);
}

sub nlmsg {
    my ($type, $flags, $seq, $payload) = @_;
    my $len = 16 + length $payload;
    return pack('L S S L L', $len, $type, $flags, $seq, 0) . $payload . ("\0" x ((4 - $len % 4) % 4));
}

sub try_nftables {
    socket(my $s, 16, SOCK_RAW, 12) or return refused_by("socket(AF_NETLINK, NETLINK_NETFILTER)", $! + 0);
    my $name = "sluice_probe\0";
    my $attr = pack('S S', 4 + length $name, 1) . $name . ("\0" x ((4 - length($name) % 4) % 4));
    # NFNL_MSG_BATCH_BEGIN, NFT_MSG_NEWTABLE (inet, NLM_F_CREATE|NLM_F_ACK), NFNL_MSG_BATCH_END.
    my $batch = nlmsg(0x10, 1, 1, pack('C C n', 0, 0, 10))
        . nlmsg((10 << 8) | 0, 1 | 0x400 | 4, 2, pack('C C n', 1, 0, 0) . $attr)
        . nlmsg(0x11, 1, 3, pack('C C n', 0, 0, 10));
    defined send($s, $batch, 0) or return refused_by("send the nftables batch", $! + 0);
    my %acks;
    for (1 .. 10) {
        my $rin = '';
        vec($rin, fileno($s), 1) = 1;
        last unless select(my $rout = $rin, undef, undef, 2);
        defined recv($s, my $buf, 65536, 0) or last;
        while (length $buf >= 16) {
            my ($len, $type, undef, $seq) = unpack('L S S L', $buf);
            last if $len < 16;
            $acks{$seq} = unpack('l', substr($buf, 16, 4)) if $type == 2 && length $buf >= 20;
            $buf = length $buf > $len ? substr($buf, ($len + 3) & ~3) : '';
        }
        last if exists $acks{2} || grep { $acks{$_} != 0 } keys %acks;
    }
    return (1, "created nftables table inet sluice_probe") if defined $acks{2} && $acks{2} == 0;
    my ($seq) = grep { $acks{$_} != 0 } sort keys %acks;
    return (1, "NOT TRIED: no answer from nfnetlink") unless defined $seq;
    return refused_by("nfnetlink NEWTABLE (answer to message $seq)", -$acks{$seq});
}

sub statfs_mb {
    my $path = shift;
    my $buf = "\0" x 120;
    return '?' if syscall(SYS_STATFS, $path, $buf) < 0;
    my (undef, $bsize, $blocks) = unpack('q< q< Q<', $buf);
    return int($bsize * $blocks / 1048576);
}

sub try_write_root {
    my $f = '/probe-escape';
    if (open(my $fh, '>', $f)) { close $fh; unlink $f; return "a file was created at /" }
    return "writing / then: " . errstr($! + 0);
}

sub try_fspick {
    my ($path, $key, $value) = @_;
    my $fd = syscall(SYS_FSPICK, AT_FDCWD, $path, 1);
    return refused_by("fspick($path)", $! + 0) if $fd < 0;
    # Perl passes strings to syscall by pointer, and only from variables it may modify.
    my ($k, $v) = ($key, $value);
    # FSCONFIG_SET_STRING (1) with a value, FSCONFIG_SET_FLAG (0) without.
    my $set = defined $v ? syscall(SYS_FSCONFIG, $fd, 1, $k, $v, 0)
                         : syscall(SYS_FSCONFIG, $fd, 0, $k, 0, 0);
    my $set_r = $set == 0 ? 'ok' : errstr($! + 0);
    my $re = syscall(SYS_FSCONFIG, $fd, 7, 0, 0, 0);
    my $re_r = $re == 0 ? 'ok' : errstr($! + 0);
    my $after = $path eq '/tmp' ? "/tmp is now " . statfs_mb('/tmp') . " MiB" : try_write_root();
    my $what = defined $value ? "$key=$value" : $key;
    return (1, "fspick($path) gave fd $fd; fsconfig $what: $set_r; reconfigure: $re_r; $after");
}

sub try_mount_setattr {
    # Clear MOUNT_ATTR_RDONLY on /.
    my $attr = pack('Q<4', 0, 1, 0, 0);
    my $root = '/';
    my $r = syscall(SYS_MOUNT_SETATTR, AT_FDCWD, $root, 0, $attr, length $attr);
    return (1, "mount_setattr(/, clear RDONLY) succeeded; " . try_write_root()) if $r == 0;
    return refused_by("mount_setattr(/, clear RDONLY)", $! + 0);
}

sub try_host_etc {
    opendir(my $d, '/etc');
    my @etc = $d ? sort grep { !/^\.\.?$/ } readdir $d : ();
    my $list = "/etc holds [" . join(' ', @etc) . "]";
    if (open(my $fh, '<', '/etc/hostname')) {
        my $h = <$fh> // '';
        chomp $h;
        return (1, "read the host's /etc/hostname: '$h'; $list");
    }
    my $e = $! + 0;
    return (0, "open /etc/hostname: " . errstr($e) . "; $list", errname($e));
}

sub try_dev_kvm {
    return (1, "opened /dev/kvm") if sysopen(my $fh, '/dev/kvm', O_RDWR);
    return refused_by("open /dev/kvm", $! + 0);
}

sub try_fork_bomb {
    my $cap = shift;
    my (@kids, $err);
    while (@kids < $cap) {
        my $p = fork;
        if (!defined $p) { $err = $! + 0; last }
        if ($p == 0) { POSIX::pause() while 1; POSIX::_exit(0) }
        push @kids, $p;
    }
    my $n = @kids;
    kill 'KILL', @kids;
    waitpid($_, 0) for @kids;
    return (1, "$n processes and no bound (the probe stopped at $cap)") unless defined $err;
    return (0, "bounded: fork failed after $n processes: " . errstr($err), errname($err));
}

sub try_fill_tmp {
    my $cap_mb = shift;
    local $SIG{XFSZ} = 'IGNORE';
    my $chunk = "\0" x 1048576;
    my ($bytes, $err, $file) = (0, undef, 0);
    FILL: while ($bytes < ($cap_mb * 2 + 16) * 1048576) {
        open(my $fh, '>', "/tmp/probe-fill-$file") or do { $err = $! + 0; last };
        $file++;
        for (1 .. 16) {
            my $n = syswrite($fh, $chunk);
            if (!defined $n) { $err = $! + 0; close $fh; last FILL }
            $bytes += $n;
        }
        close $fh;
    }
    unlink glob('/tmp/probe-fill-*');
    my $mb = sprintf('%.1f', $bytes / 1048576);
    return (1, "wrote $mb MiB and was not stopped") unless defined $err;
    return (1, "wrote $mb MiB, past the $cap_mb MiB cap, then " . errstr($err), errname($err))
        if $bytes > ($cap_mb + 1) * 1048576;
    return (0, "wrote $mb MiB of a $cap_mb MiB cap, then " . errstr($err), errname($err));
}

sub try_map_memory {
    my $cap_mb = shift;
    my ($mb, $err) = (0, undef);
    while ($mb < $cap_mb) {
        # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE: address space only, no memory used.
        my $a = syscall(SYS_MMAP, 0, 256 << 20, 0, 0x2 | 0x20 | 0x4000, -1, 0);
        if ($a == -1) { $err = $! + 0; last }
        $mb += 256;
    }
    return (1, "mapped $mb MiB and no bound (the probe stopped at $cap_mb MiB)") unless defined $err;
    return (0, "bounded: mapped $mb MiB, then " . errstr($err), errname($err));
}

sub run_probe {
    my $event = shift;
    my $num = sub { my ($k, $d) = @_; return $event =~ /"\Q$k\E"\s*:\s*(\d+)/ ? $1 : $d };
    my $tmp_cap = $num->('tmp_cap_mb', 512);
    my $fork_cap = $num->('fork_cap', 1500);
    my $map_cap = $num->('map_cap_mb', undef);
    my @results = (
        attempt('CapEff, uid, no_new_privs', 5, \&try_capabilities),
        attempt('x32 system call', 5, \&try_x32),
        attempt('io_uring_setup', 5, \&try_io_uring),
        attempt('clone(CLONE_NEWUSER|CLONE_NEWNET)', 5, \&try_clone_newuser),
        attempt('clone3(CLONE_NEWUSER|CLONE_NEWNET)', 5, \&try_clone3),
        attempt('pidfd_getfd on PID 1', 5, \&try_pidfd_getfd),
        attempt('/proc/1/mem read-write', 5, \&try_proc_mem),
        attempt('ptrace PID 1', 5, \&try_ptrace),
        attempt('signal PID 1', 5, \&try_signal_agent),
        attempt('nftables table over netlink', 10, \&try_nftables),
        attempt("the host's /etc/hostname", 5, \&try_host_etc),
        attempt('/dev/kvm', 5, \&try_dev_kvm),
        attempt("fill /tmp past its cap", 60, sub { try_fill_tmp($tmp_cap) }),
        attempt('fork bomb', 60, sub { try_fork_bomb($fork_cap) }),
        (defined $map_cap ? attempt('map memory past the limit', 30, sub { try_map_memory($map_cap) }) : ()),
        attempt('mount_setattr on / (clear read-only)', 5, \&try_mount_setattr),
        attempt('fspick/fsconfig on /tmp (grow it)', 5, sub { try_fspick('/tmp', 'size', '100g') }),
        attempt('fspick/fsconfig on / (make it writable)', 5, sub { try_fspick('/', 'rw', undef) }),
    );
    return '[' . join(',', map {
        '{"attempt":' . js($_->{attempt}) . ',"escaped":' . ($_->{escaped} ? 'true' : 'false')
            . ',"got":' . js($_->{got}) . ',"errno":' . js($_->{errno}) . '}'
    } @results) . ']';
}

my $api = $ENV{AWS_LAMBDA_RUNTIME_API} or die "AWS_LAMBDA_RUNTIME_API is not set\n";

sub http {
    my ($method, $path, $body) = @_;
    $body //= '';
    my $s = IO::Socket::INET->new(PeerAddr => $api, Proto => 'tcp') or die "connect $api: $!\n";
    binmode $s;
    print $s "$method $path HTTP/1.1\r\nHost: $api\r\nConnection: close\r\n"
        . "Content-Type: application/json\r\nContent-Length: " . length($body) . "\r\n\r\n$body";
    my $resp = do { local $/; <$s> } // '';
    close $s;
    my ($head, $rest) = split /\r\n\r\n/, $resp, 2;
    return ($head // '', $rest // '');
}

while (1) {
    my ($head, $event) = http('GET', '/2018-06-01/runtime/invocation/next');
    my ($id) = $head =~ /^lambda-runtime-aws-request-id:\s*(\S+)/mi;
    die "no request id in: $head\n" unless defined $id;
    http('POST', "/2018-06-01/runtime/invocation/$id/response", run_probe($event));
}
