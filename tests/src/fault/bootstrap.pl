#!/usr/bin/perl
# fault-fn: the fault suite's function. A custom-runtime `bootstrap` in Perl (perl-base only, which
# the jail's read-only /usr provides), so that each invocation reports what it got on stdout, which
# the node logs (target `function`) and the suite reads back as its ledger of invocations.
#
# A Kafka batch: each record's value is `KEY SEQ` (or `KEY SEQ poison`). If any record is poison
# the whole batch fails (a function error) and nothing is printed; otherwise it prints, per record,
#   FAULTR <inv> <partition> <offset> <KEY> <SEQ>
# then one line for the invocation, with its start and end on the host's uptime clock (1/100 s):
#   FAULTI <inv> <start_cs> <end_cs>
# and succeeds. An async event `{"fault":"KEY SEQ"}` prints `FAULTR <inv> a - KEY SEQ` the same way.
# `<inv>` is unique per invocation. FAULT_SLEEP_MS (environment) makes each invocation take that
# long, so that faults land while batches are in flight.
use strict;
use warnings;
use IO::Socket::INET;

$| = 1;
my $api = $ENV{AWS_LAMBDA_RUNTIME_API} or die "AWS_LAMBDA_RUNTIME_API is not set\n";
my $tag = sprintf('%x%06x', time, int(rand(0xffffff)));
my $sleep_s = ($ENV{FAULT_SLEEP_MS} // 0) / 1000;

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

# Base64 through unpack("u"), as MIME::Base64::Perl does (MIME::Base64 is not in perl-base).
sub b64d {
    my $s = shift // '';
    $s =~ tr|A-Za-z0-9+=/||cd;
    $s =~ s/=+$//;
    $s =~ tr|A-Za-z0-9+/| -_|;
    return '' unless length $s;
    my $uu = '';
    my $i = 0;
    for (; $i <= length($s) - 60; $i += 60) { $uu .= 'M' . substr($s, $i, 60) }
    my $rest = substr($s, $i);
    $uu .= chr(32 + int(length($rest) * 3 / 4)) . $rest if length $rest;
    return unpack('u', $uu);
}

sub now_cs {
    if (open my $f, '<', '/proc/uptime') {
        my ($up) = (<$f> // '') =~ /^(\d+)\.(\d+)/;
        return $1 * 100 + $2 if defined $up;
    }
    return time * 100;
}

my $n = 0;
while (1) {
    my ($head, $event) = http('GET', '/2018-06-01/runtime/invocation/next');
    my ($id) = $head =~ /^lambda-runtime-aws-request-id:\s*(\S+)/mi;
    die "no request id in: $head\n" unless defined $id;
    my $start = now_cs();
    $n++;
    my $inv = "$tag.$n";
    my @lines;
    my $poison = 0;
    if ($event =~ /"records"/) {
        # Each record is an object without nested ones (the suite's records have no headers).
        for my $c ($event =~ /\{([^{}]*"value":"[^"]*"[^{}]*)\}/g) {
            my ($p) = $c =~ /"partition":(\d+)/;
            my ($o) = $c =~ /"offset":(\d+)/;
            my ($v) = $c =~ /"value":"([^"]*)"/;
            my $value = b64d($v);
            $poison = 1 if $value =~ /poison/;
            push @lines, "FAULTR $inv " . ($p // '-') . ' ' . ($o // '-') . " $value";
        }
    } else {
        my ($v) = $event =~ /"fault":"([^"]*)"/;
        $v //= '';
        $poison = 1 if $v =~ /poison/;
        push @lines, "FAULTR $inv a - $v";
    }
    select(undef, undef, undef, $sleep_s) if $sleep_s > 0;
    if ($poison) {
        http('POST', "/2018-06-01/runtime/invocation/$id/error",
            '{"errorMessage":"poison record","errorType":"Fault.Poison"}');
        next;
    }
    print "$_\n" for @lines;
    print "FAULTI $inv $start " . now_cs() . "\n";
    http('POST', "/2018-06-01/runtime/invocation/$id/response", '{"batchItemFailures":[]}');
}
