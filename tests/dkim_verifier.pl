#!/usr/bin/perl
# An independent DKIM verifier for tests/test_dkim.py: Debian's Mail::DKIM (libmail-dkim-perl),
# not dkimpy. Reads one message (CRLF) on standard input, asks for keys at the loopback DNS
# server 127.0.0.1:PORT only, and prints one line per signature, in header order:
#     RESULT DOMAIN SELECTOR DETAIL
# RESULT is Mail::DKIM's: pass, fail, invalid, temperror, none.
#     perl tests/dkim_verifier.pl PORT < message
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my $port = shift @ARGV or die "usage: dkim_verifier.pl PORT < message\n";
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ["127.0.0.1"], port => $port, recurse => 0, usevc => 0,
    udp_timeout => 3, tcp_timeout => 3, retry => 1, searchlist => [], defnames => 0));

binmode STDIN;
my $verifier = Mail::DKIM::Verifier->new();
while (my $chunk = <STDIN>) {
    $verifier->PRINT($chunk);
}
$verifier->CLOSE();
my @signatures = $verifier->signatures;
print "none - - no signature\n" unless @signatures;
foreach my $signature (@signatures) {
    my $detail = $signature->result_detail // "";
    $detail =~ s/\s+/ /g;
    printf "%s %s %s %s\n", $signature->result, $signature->domain // "-",
        $signature->selector // "-", $detail;
}
