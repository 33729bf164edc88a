// ocsp_check parses an OCSP response the way Go TLS clients do
// (golang.org/x/crypto/ocsp.ParseResponseForCert: DER parsing, CertID, signature,
// delegated responder certificate signed by the issuer) and prints one line:
//
//	status=good serial=<hex> reason=<code> hash=SHA-1
//	error-status=6                   (an unsigned error answer: its responseStatus)
//
// Usage: ocsp_check RESPONSE.der ISSUER.pem; exit 1 if Go rejects the response.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"golang.org/x/crypto/ocsp"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ocsp_check RESPONSE.der ISSUER.pem")
		os.Exit(2)
	}
	der, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(2)
	}
	pemBytes, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(2)
	}
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		fmt.Println("error: no PEM certificate in", os.Args[2])
		os.Exit(2)
	}
	issuer, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(2)
	}
	resp, err := ocsp.ParseResponseForCert(der, nil, issuer)
	var status ocsp.ResponseError
	if errors.As(err, &status) {
		fmt.Printf("error-status=%d\n", int(status.Status))
		return
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	name := map[int]string{ocsp.Good: "good", ocsp.Revoked: "revoked", ocsp.Unknown: "unknown"}
	fmt.Printf("status=%s serial=%x reason=%d hash=%v\n",
		name[resp.Status], resp.SerialNumber, resp.RevocationReason, resp.IssuerHash)
}
