// Command kolm_interop verifies a kolm receipt bundle with Go's golang.org/x/mod/sumdb
// packages and nothing of kolm: an independent reading of docs/FORMATS.md.
//
//	kolm_interop -bundle R.kolm-receipt.json -vkey log.vkey \
//	    [-old-checkpoint OLD.note -consistency PROOF.txt]
//
// It checks, in order:
//
//  1. the bundle is a JSON object with exactly envelope, integrated_time, tlog_proof, and
//     the envelope has exactly payload, payloadType, signatures[{keyid, sig}];
//  2. every base64 string decodes with base64.StdEncoding.Strict() and re-encodes to
//     itself (so "h==" where the encoding is "g==" is refused);
//  3. the leaf: RecordHash(JCS({"envelope": <envelope>, "integrated_time": <int>}));
//  4. the checkpoint note verifies with note.Open under the vkey(s), and a signature
//     that verified is by the key named after the checkpoint's origin;
//  5. tlog.CheckRecord: the leaf is entry <index> of the tree the checkpoint commits to;
//  6. with -old-checkpoint: that note verifies too, and tlog.CheckTree proves the
//     bundle's checkpoint extends it (PROOF: one base64 hash per line, RFC 6962 order).
//
// It prints "OK ..." and exits 0, or prints "FAIL: <reason>" and exits 1 (2: usage).
// It does not parse the in-toto statement or judge keys: kolm verify does that; this
// program checks the log's cryptography and the byte formats.
//
// Build offline against Debian's golang-golang-x-mod-dev (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o kolm_interop kolm_interop.go
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const proofHeader = "c2sp.org/tlog-proof@v1"

// maxTime is the largest integration time a leaf holds (an exact IEEE-754 integer).
const maxTime = 1<<53 - 1

var decimal = regexp.MustCompile(`^(0|[1-9][0-9]{0,18})$`)

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL: "+format+"\n", args...)
	os.Exit(1)
}

// strictB64 decodes canonical standard base64: Go's strict decoder (padding bits zero)
// plus re-encoding to the same text (the strict decoder still skips CR and LF).
func strictB64(s, what string) []byte {
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		fail("%s: not strict base64: %v", what, err)
	}
	if base64.StdEncoding.EncodeToString(b) != s {
		fail("%s: not canonical base64", what)
	}
	return b
}

// object decodes a JSON object whose keys must be exactly want.
func object(raw json.RawMessage, what string, want ...string) map[string]json.RawMessage {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		fail("%s: not a JSON object: %v", what, err)
	}
	var got []string
	for k := range m {
		got = append(got, k)
	}
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		fail("%s: fields %v, want exactly %v", what, got, want)
	}
	return m
}

// plainString decodes a JSON string that must be printable ASCII without '"' or '\':
// then encoding/json writes it exactly as RFC 8785 does (no escapes at all).
func plainString(raw json.RawMessage, what string) string {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		fail("%s: not a string: %v", what, err)
	}
	for _, c := range []byte(s) {
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			fail("%s: holds %q; this reference verifier handles printable ASCII only", what, c)
		}
	}
	return s
}

type signature struct {
	Keyid string `json:"keyid"`
	Sig   string `json:"sig"`
}

type envelope struct {
	Payload     string      `json:"payload"`
	PayloadType string      `json:"payloadType"`
	Signatures  []signature `json:"signatures"`
}

// leafData is JCS({"envelope": env, "integrated_time": t}): encoding/json sorts map keys,
// writes these plain ASCII strings and the integer as RFC 8785 does, and (with HTML
// escaping off) adds no escapes; Encode's trailing newline is dropped.
func leafData(env envelope, t int64) []byte {
	sigs := make([]map[string]string, len(env.Signatures))
	for i, s := range env.Signatures {
		sigs[i] = map[string]string{"keyid": s.Keyid, "sig": s.Sig}
	}
	obj := map[string]interface{}{
		"envelope": map[string]interface{}{
			"payload":     env.Payload,
			"payloadType": env.PayloadType,
			"signatures":  sigs,
		},
		"integrated_time": t,
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(obj); err != nil {
		fail("encoding the leaf: %v", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

// openCheckpoint verifies a signed checkpoint note and parses its body (C2SP
// tlog-checkpoint: origin, size, base64 root, then extension lines, here ignored).
func openCheckpoint(msg []byte, verifiers note.Verifiers, what string) checkpoint {
	n, err := note.Open(msg, verifiers)
	if err != nil {
		fail("%s: note.Open: %v", what, err)
	}
	lines := strings.Split(strings.TrimSuffix(n.Text, "\n"), "\n")
	if len(lines) < 3 {
		fail("%s: %d lines, want at least 3", what, len(lines))
	}
	cp := checkpoint{origin: lines[0]}
	if !decimal.MatchString(lines[1]) {
		fail("%s: size line %q", what, lines[1])
	}
	cp.size, err = strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("%s: size: %v", what, err)
	}
	root := strictB64(lines[2], what+" root")
	if len(root) != tlog.HashSize {
		fail("%s: root has %d bytes", what, len(root))
	}
	copy(cp.root[:], root)
	signedByOrigin := false
	for _, s := range n.Sigs {
		if s.Name == cp.origin {
			signedByOrigin = true
		}
	}
	if !signedByOrigin {
		fail("%s: no verified signature by the origin's key %q", what, cp.origin)
	}
	return cp
}

func hashLines(lines []string, what string) []tlog.Hash {
	var out []tlog.Hash
	for i, l := range lines {
		b := strictB64(l, fmt.Sprintf("%s hash %d", what, i))
		if len(b) != tlog.HashSize {
			fail("%s hash %d has %d bytes", what, i, len(b))
		}
		var h tlog.Hash
		copy(h[:], b)
		out = append(out, h)
	}
	return out
}

func readFile(path, what string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Printf("usage: cannot read %s: %v\n", what, err)
		os.Exit(2)
	}
	return b
}

func main() {
	bundlePath := flag.String("bundle", "", "kolm bundle (.kolm-receipt.json)")
	vkeyPath := flag.String("vkey", "", "file of signed-note verifier keys (kolm ledger vkey)")
	oldPath := flag.String("old-checkpoint", "", "an earlier signed checkpoint of the log")
	consPath := flag.String("consistency", "", "consistency proof from -old-checkpoint")
	flag.Parse()
	if *bundlePath == "" || *vkeyPath == "" || (*oldPath == "") != (*consPath == "") {
		fmt.Println("usage: kolm_interop -bundle F -vkey F [-old-checkpoint F -consistency F]")
		os.Exit(2)
	}

	var vs []note.Verifier
	for _, line := range strings.Split(string(readFile(*vkeyPath, "vkey")), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			v, err := note.NewVerifier(line)
			if err != nil {
				fail("vkey %q: %v", line, err)
			}
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		fail("no verifier key in %s", *vkeyPath)
	}
	verifiers := note.VerifierList(vs...)

	// (1) the bundle's and the envelope's fields, exactly
	b := object(readFile(*bundlePath, "bundle"), "bundle", "envelope", "integrated_time", "tlog_proof")
	e := object(b["envelope"], "envelope", "payload", "payloadType", "signatures")
	var env envelope
	env.Payload = plainString(e["payload"], "envelope.payload")
	env.PayloadType = plainString(e["payloadType"], "envelope.payloadType")
	var sigs []json.RawMessage
	if err := json.Unmarshal(e["signatures"], &sigs); err != nil || len(sigs) == 0 {
		fail("envelope.signatures: want a non-empty list")
	}
	for i, raw := range sigs {
		what := fmt.Sprintf("envelope.signatures[%d]", i)
		s := object(raw, what, "keyid", "sig")
		env.Signatures = append(env.Signatures, signature{
			Keyid: plainString(s["keyid"], what+".keyid"),
			Sig:   plainString(s["sig"], what+".sig"),
		})
	}
	var tn json.Number
	dec := json.NewDecoder(bytes.NewReader(b["integrated_time"]))
	dec.UseNumber()
	if err := dec.Decode(&tn); err != nil || !decimal.MatchString(tn.String()) {
		fail("integrated_time: want a non-negative decimal integer, got %s", b["integrated_time"])
	}
	t, err := strconv.ParseInt(tn.String(), 10, 64)
	if err != nil || t > maxTime {
		fail("integrated_time %s: want at most 2^53-1", tn)
	}
	var proofText string
	if err := json.Unmarshal(b["tlog_proof"], &proofText); err != nil {
		fail("tlog_proof: want a string")
	}

	// (2) strict base64, so the envelope hashed below is the one given
	strictB64(env.Payload, "envelope.payload")
	for i, s := range env.Signatures {
		strictB64(s.Sig, fmt.Sprintf("envelope.signatures[%d].sig", i))
	}

	// (3) the leaf hash
	leaf := tlog.RecordHash(leafData(env, t))

	// the tlog-proof: header, optional extra, index, hashes, blank line, checkpoint note
	head, notePart, ok := strings.Cut(proofText, "\n\n")
	if !ok {
		fail("tlog_proof: no blank line before the checkpoint")
	}
	lines := strings.Split(head, "\n")
	if lines[0] != proofHeader {
		fail("tlog_proof: first line %q", lines[0])
	}
	lines = lines[1:]
	if len(lines) > 0 && strings.HasPrefix(lines[0], "extra ") {
		lines = lines[1:]
	}
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "index ") ||
		!decimal.MatchString(strings.TrimPrefix(lines[0], "index ")) {
		fail("tlog_proof: no 'index N' line")
	}
	index, _ := strconv.ParseInt(strings.TrimPrefix(lines[0], "index "), 10, 64)
	proof := tlog.RecordProof(hashLines(lines[1:], "inclusion"))

	// (4) the checkpoint note
	cp := openCheckpoint([]byte(notePart), verifiers, "checkpoint")

	// (5) inclusion
	if err := tlog.CheckRecord(proof, cp.size, cp.root, index, leaf); err != nil {
		fail("tlog.CheckRecord(index %d, size %d): %v", index, cp.size, err)
	}

	// (6) consistency with an older checkpoint
	if *oldPath != "" {
		old := openCheckpoint(readFile(*oldPath, "old checkpoint"), verifiers, "old checkpoint")
		if old.origin != cp.origin {
			fail("old checkpoint origin %q, bundle's %q", old.origin, cp.origin)
		}
		text := strings.TrimSuffix(string(readFile(*consPath, "consistency proof")), "\n")
		var hs []tlog.Hash
		if text != "" {
			hs = hashLines(strings.Split(text, "\n"), "consistency")
		}
		switch {
		case old.size > cp.size:
			fail("old checkpoint size %d is larger than %d", old.size, cp.size)
		case old.size == cp.size:
			if old.root != cp.root || len(hs) != 0 {
				fail("checkpoints of size %d differ", old.size)
			}
		case old.size == 0:
			if len(hs) != 0 {
				fail("a proof from the empty tree has no hashes")
			}
		default:
			if err := tlog.CheckTree(tlog.TreeProof(hs), cp.size, cp.root, old.size, old.root); err != nil {
				fail("tlog.CheckTree(%d -> %d): %v", old.size, cp.size, err)
			}
		}
		fmt.Printf("OK index=%d size=%d origin=%s leaf=%s consistent-from=%d\n",
			index, cp.size, cp.origin, leaf, old.size)
		return
	}
	fmt.Printf("OK index=%d size=%d origin=%s leaf=%s\n", index, cp.size, cp.origin, leaf)
}
