// ocsp_check is an OCSP client the way Go TLS software (e.g. certmagic's stapling) is
// one: golang.org/x/crypto/ocsp builds the request and ParseResponseForCert checks the
// answer (DER, CertID, signature, a delegated responder certificate signed by the
// issuer). It prints one line:
//
//	status=good serial=<hex> reason=<code> hash=SHA-1
//	error-status=6                   (an unsigned error answer: its responseStatus)
//
// Usage:
//
//	ocsp_check parse RESPONSE.der ISSUER.pem
//	ocsp_check ask POST|GET URL LEAF.pem ISSUER.pem sha1|sha256
//
// Exit 1 if Go rejects the response, 2 on a usage or input error.
package main

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"golang.org/x/crypto/ocsp"
)

func fail(code int, args ...interface{}) {
	fmt.Println(append([]interface{}{"error:"}, args...)...)
	os.Exit(code)
}

func readCert(path string) *x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		fail(2, err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		fail(2, "no PEM certificate in", path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		fail(2, err)
	}
	return cert
}

// ask sends a request for leaf as Go clients do: POST the DER, or GET the plain
// base64 appended to the URL (what clients that do not escape it send).
func ask(method, url string, leaf, issuer *x509.Certificate, hash string) []byte {
	opts := &ocsp.RequestOptions{Hash: crypto.SHA1}
	if hash == "sha256" {
		opts.Hash = crypto.SHA256
	}
	req, err := ocsp.CreateRequest(leaf, issuer, opts)
	if err != nil {
		fail(2, err)
	}
	var resp *http.Response
	if method == "GET" {
		resp, err = http.Get(strings.TrimSuffix(url, "/") + "/" + base64.StdEncoding.EncodeToString(req))
	} else {
		resp, err = http.Post(url, "application/ocsp-request", bytes.NewReader(req))
	}
	if err != nil {
		fail(1, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/ocsp-response" {
		fail(1, "HTTP", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	der, err := io.ReadAll(resp.Body)
	if err != nil {
		fail(1, err)
	}
	return der
}

func main() {
	var der []byte
	var issuer, leaf *x509.Certificate
	var err error
	switch {
	case len(os.Args) == 4 && os.Args[1] == "parse":
		if der, err = os.ReadFile(os.Args[2]); err != nil {
			fail(2, err)
		}
		issuer = readCert(os.Args[3])
	case len(os.Args) == 7 && os.Args[1] == "ask":
		leaf, issuer = readCert(os.Args[4]), readCert(os.Args[5])
		der = ask(os.Args[2], os.Args[3], leaf, issuer, os.Args[6])
	default:
		fmt.Fprintln(os.Stderr, "usage: ocsp_check parse RESPONSE.der ISSUER.pem | ask POST|GET URL LEAF.pem ISSUER.pem sha1|sha256")
		os.Exit(2)
	}
	resp, err := ocsp.ParseResponseForCert(der, leaf, issuer)
	var status ocsp.ResponseError
	if errors.As(err, &status) {
		fmt.Printf("error-status=%d\n", int(status.Status))
		return
	}
	if err != nil {
		fail(1, err)
	}
	name := map[int]string{ocsp.Good: "good", ocsp.Revoked: "revoked", ocsp.Unknown: "unknown"}
	fmt.Printf("status=%s serial=%x reason=%d hash=%v\n",
		name[resp.Status], resp.SerialNumber, resp.RevocationReason, resp.IssuerHash)
}
