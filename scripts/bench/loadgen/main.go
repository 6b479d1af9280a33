// loadgen: a small open-loop HTTP/1.1 load generator for
// scripts/bench-http.sh, standard library only; with -proto grpc it calls
// Envoy's rate limit service over HTTP/2 instead (grpc.go).
//
// Why not vegeta: on the 2-core bench machine vegeta's client costs more CPU
// per request than the server under test, and it could not even send 12,700
// requests/s (it sent 7,300/s and its latencies measured itself). This one
// writes pre-serialised requests on raw keep-alive connections and reads
// responses with a minimal parser, so nearly all the CPU goes to the server.
//
// Fixed rate (-rate N): request i is due at start + i/N whatever happened
// before, and its latency is measured from that due time, so time spent
// waiting for a free connection counts (no coordinated omission). With
// -rate 0 every connection sends back to back (maximum throughput).
//
// Churn (-churn N, for scripts/soak.sh): the -users ordinary users are a
// window that moves N users a second through an unbounded population, so
// users go idle for good and their keys must expire on the server; with
// -hot-churn M the hot user is replaced M times a second, so keys in breach
// churn too.
//
// Slices (-interval D -slices FILE): also one JSON line per D of due time
// (p50/p99/max, statuses, errors), written at the end, for a soak's
// per-interval p99.
//
// Partitions (-partitions N -only P,...): only users whose Kafka partition
// (murmur2 of the user id, partition.go) is one of P, for a Kafka-mode group
// loaded with keys of one owner (scripts/bench-group.sh).
//
// Loopback only: -addr must be a 127.0.0.0/8 address or [::1]. Linux only
// (the pacing thread uses nanosleep).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type result struct {
	latencies []time.Duration // from due time to response
	service   []time.Duration // from the write to the response
	lags      []time.Duration // from due time to the write
	statuses  map[int]int
	errors    map[string]int
	// With -interval: marks[k] is the index in latencies of the first
	// answer due in slice k (a connection takes due times in order), and
	// slices[k] that slice's statuses and errors.
	marks  []int
	slices []*counts
}

type counts struct {
	statuses map[int]int
	errors   map[string]int
}

// slice returns the counts of slice k, opening slices up to k.
func (r *result) slice(k int) *counts {
	for len(r.slices) <= k {
		r.marks = append(r.marks, len(r.latencies))
		r.slices = append(r.slices, &counts{map[int]int{}, map[string]int{}})
	}
	return r.slices[k]
}

func main() {
	addr := flag.String("addr", "127.0.0.1:18181", "server address (loopback only)")
	path := flag.String("path", "/check", "request path")
	rate := flag.Float64("rate", 0, "requests per second; 0 = as fast as the connections go")
	duration := flag.Duration("duration", 15*time.Second, "how long to send")
	conns := flag.Int("conns", 32, "keep-alive connections")
	users := flag.Int("users", 10000, "ordinary users the bodies cycle over")
	hotEvery := flag.Int("hot-every", 20, "1 request in this many is from the hot user")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request timeout")
	jsonOut := flag.String("json", "", "also write the summary as JSON to this file")
	bodyKind := flag.String("body", "quotaflow", "request body: quotaflow (POST /check JSON) or envoy "+
		"(envoyproxy/ratelimit's /json form, domain \"bench\", descriptor user_id)")
	proto := flag.String("proto", "http1", "http1 (POST -path with -body) or grpc (Envoy's "+
		"ShouldRateLimit over cleartext HTTP/2, domain \"bench\", descriptor user_id; -path and -body unused)")
	churn := flag.Float64("churn", 0, "users per second by which the window of -users ordinary users moves on "+
		"(0: the same -users users throughout)")
	hotChurn := flag.Float64("hot-churn", 0, "with -churn: a new hot user this many times a second "+
		"(0: one hot user throughout)")
	interval := flag.Duration("interval", 0, "with -slices: report every interval of due time")
	slicesOut := flag.String("slices", "", "write one JSON line per -interval to this file at the end")
	partitions := flag.Int("partitions", 0, "with -only: the requests topic's partition count")
	only := flag.String("only", "", "send only users whose Kafka partition (murmur2 of the user id, "+
		"as Java clients partition) is one of these, comma-separated, of -partitions")
	flag.Parse()

	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		fail("bad -addr: %v", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		fail("-addr must be a loopback address, got %q", host)
	}
	// Up to a day (a soak): every answer keeps 24 bytes until the end.
	if *duration <= 0 || *duration > 24*time.Hour || *conns < 1 || *conns > 4096 || *rate < 0 || *churn < 0 || *hotChurn < 0 {
		fail("need 0 < -duration <= 24h, 1 <= -conns <= 4096, -rate >= 0, -churn >= 0, -hot-churn >= 0")
	}
	if *hotChurn > 0 && *churn == 0 {
		fail("-hot-churn needs -churn")
	}
	if (*interval > 0) != (*slicesOut != "") {
		fail("-interval and -slices go together")
	}
	if *churn > 0 && *proto == "grpc" {
		fail("-churn builds HTTP/1.1 requests: not with -proto grpc")
	}
	filter, err := parsePartitionFilter(*partitions, *only)
	if err != nil {
		fail("%v", err)
	}
	if *churn > 0 && filter.only != nil {
		fail("-only picks a fixed set of users: not with -churn")
	}
	if *users < 1 {
		fail("need -users >= 1")
	}
	names, hot := userNames(*users, filter)

	if *bodyKind != "quotaflow" && *bodyKind != "envoy" {
		fail("-body must be quotaflow or envoy, got %q", *bodyKind)
	}
	var reqs [][]byte
	switch *proto {
	case "http1":
		reqs = buildRequests(*addr, *path, names, hot, *hotEvery, *bodyKind)
	case "grpc":
		reqs = grpcBodies(names, hot, *hotEvery)
	default:
		fail("-proto must be http1 or grpc, got %q", *proto)
	}
	jobs := make(chan time.Time, 1<<16)
	var next atomic.Uint64 // index into reqs, shared by all connections
	results := make([]result, *conns)
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(*duration)

	for c := 0; c < *conns; c++ {
		wg.Add(1)
		go func(r *result) {
			defer wg.Done()
			r.statuses = map[int]int{}
			r.errors = map[string]int{}
			var conn caller
			var buf []byte // the request, when built per request (-churn)
			var sl *counts // this request's slice (-interval), else nil
			for {
				var due time.Time
				if *rate > 0 {
					var ok bool
					if due, ok = <-jobs; !ok {
						break
					}
				} else {
					due = time.Now()
					if !due.Before(deadline) {
						break
					}
				}
				if *interval > 0 {
					// max: an answer never goes to an earlier slice than
					// the one before it (due times arrive in order anyway).
					sl = r.slice(atLeast(int(due.Sub(start) / *interval), len(r.slices)-1))
				}
				if conn == nil {
					c, err := dial(*proto, *addr, *timeout)
					if err != nil {
						r.errors["dial: "+err.Error()]++
						if sl != nil {
							sl.errors["dial: "+err.Error()]++
						}
						time.Sleep(10 * time.Millisecond)
						continue
					}
					conn = c
				}
				i := next.Add(1)
				var req []byte
				if *churn > 0 {
					t := due.Sub(start).Seconds()
					buf = churnRequest(buf[:0], *addr, *path, *bodyKind, i, *users, *hotEvery,
						uint64(*churn*t), int64(*hotChurn*t))
					req = buf
				} else {
					req = reqs[i%uint64(len(reqs))]
				}
				sentAt := time.Now()
				status, err := conn.call(req, sentAt.Add(*timeout))
				if err != nil {
					r.errors[err.Error()]++
					if sl != nil {
						sl.errors[err.Error()]++
					}
					conn.Close()
					conn = nil
					continue
				}
				r.statuses[status]++
				if sl != nil {
					sl.statuses[status]++
				}
				done := time.Now()
				r.latencies = append(r.latencies, done.Sub(due))
				r.service = append(r.service, done.Sub(sentAt))
				r.lags = append(r.lags, sentAt.Sub(due))
			}
			if conn != nil {
				conn.Close()
			}
		}(&results[c])
	}

	sent := 0
	if *rate > 0 {
		// Dispatch every request whose due time has come, then nap briefly.
		// The nap is a nanosleep on a thread of its own: Go's timers sleep at
		// least a millisecond when the process is otherwise idle, which would
		// add up to 1 ms of the generator's own delay to every latency.
		runtime.LockOSThread()
		nap := syscall.Timespec{Nsec: 50_000}
		interval := float64(time.Second) / *rate
		total := int(duration.Seconds() * *rate)
		for sent < total {
			due := int(float64(time.Since(start)) / interval)
			if due > total {
				due = total
			}
			for ; sent < due; sent++ {
				jobs <- start.Add(time.Duration(float64(sent) * interval))
			}
			_ = syscall.Nanosleep(&nap, nil)
		}
		close(jobs)
	}
	wg.Wait()
	elapsed := time.Since(start)

	var all, service, lags []time.Duration
	statuses := map[int]int{}
	errs := map[string]int{}
	for _, r := range results {
		all = append(all, r.latencies...)
		service = append(service, r.service...)
		lags = append(lags, r.lags...)
		for k, v := range r.statuses {
			statuses[k] += v
		}
		for k, v := range r.errors {
			errs[k] += v
		}
	}
	report(all, service, lags, statuses, errs, sent, *rate, *duration, elapsed, *jsonOut)
	if *slicesOut != "" {
		writeSlices(results, *interval, *duration, *slicesOut)
	}
}

func atLeast(a, b int) int {
	if a < b {
		return b
	}
	return a
}

// churnRequest appends request i of a moving population to buf: the
// ordinary user base + i%users (the window starts at base), or on every
// hotEvery-th request the hot user number hot (a hot user that breaches its
// limits, then goes idle for good when the next one takes over).
func churnRequest(buf []byte, addr, path, kind string, i uint64, users, hotEvery int, base uint64, hot int64) []byte {
	user := "hot-user-" + strconv.FormatInt(hot, 10)
	if hotEvery <= 0 || i%uint64(hotEvery) != uint64(hotEvery-1) {
		user = "user-" + strconv.FormatUint(base+i%uint64(users), 10)
	}
	body := `{"user_id":"` + user + `","method":"GET","path":"/orders"}`
	if kind == "envoy" {
		body = `{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"` + user + `"}]}]}`
	}
	buf = append(buf, "POST "...)
	buf = append(buf, path...)
	buf = append(buf, " HTTP/1.1\r\nHost: "...)
	buf = append(buf, addr...)
	buf = append(buf, "\r\nContent-Type: application/json\r\nContent-Length: "...)
	buf = strconv.AppendInt(buf, int64(len(body)), 10)
	buf = append(buf, "\r\n\r\n"...)
	return append(buf, body...)
}

type sliceSummary struct {
	Slice        int            `json:"slice"`
	StartSecs    float64        `json:"start_s"`
	EndSecs      float64        `json:"end_s"`
	Requests     int            `json:"requests"`
	Throughput   float64        `json:"throughput"`
	P50Ms        float64        `json:"p50_ms"`
	P99Ms        float64        `json:"p99_ms"`
	MaxMs        float64        `json:"max_ms"`
	ServiceP99Ms float64        `json:"service_p99_ms"`
	LagP99Ms     float64        `json:"send_lag_p99_ms"`
	StatusCodes  map[string]int `json:"status_codes"`
	Errors       map[string]int `json:"errors"`
}

// writeSlices writes one JSON line per interval of due time: the answers
// due in it, whenever they came.
func writeSlices(results []result, interval, duration time.Duration, path string) {
	n := 0
	for _, r := range results {
		n = atLeast(len(r.slices), n)
	}
	var out []byte
	for k := 0; k < n; k++ {
		var lat, svc, lag []time.Duration
		s := sliceSummary{Slice: k, StatusCodes: map[string]int{}, Errors: map[string]int{}}
		for _, r := range results {
			if k >= len(r.slices) {
				continue
			}
			from, to := r.marks[k], len(r.latencies)
			if k+1 < len(r.marks) {
				to = r.marks[k+1]
			}
			lat = append(lat, r.latencies[from:to]...)
			svc = append(svc, r.service[from:to]...)
			lag = append(lag, r.lags[from:to]...)
			for code, v := range r.slices[k].statuses {
				s.StatusCodes[strconv.Itoa(code)] += v
			}
			for e, v := range r.slices[k].errors {
				s.Errors[e] += v
			}
		}
		start := time.Duration(k) * interval
		end := start + interval
		if end > duration {
			end = duration
		}
		s.StartSecs, s.EndSecs = start.Seconds(), end.Seconds()
		s.Requests = len(lat)
		if end > start {
			s.Throughput = float64(len(lat)) / (end - start).Seconds()
		}
		s.P50Ms, s.P99Ms, s.MaxMs = quantile(lat, 0.50), quantile(lat, 0.99), quantile(lat, 1)
		s.ServiceP99Ms, s.LagP99Ms = quantile(svc, 0.99), quantile(lag, 0.99)
		b, _ := json.Marshal(s)
		out = append(append(out, b...), '\n')
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		fail("writing %s: %v", path, err)
	}
}

// quantile sorts v and returns its p-quantile in ms (0 when empty).
func quantile(v []time.Duration, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	return float64(v[int(p*float64(len(v)-1))]) / 1e6
}

// buildRequests pre-serialises one cycle of the body mix: ordinary users in
// turn, and the hot user on every hotEvery-th request (userNames: with
// -only, only users of the given partitions). kind "quotaflow" is
// the body of quotaflow's POST /check; kind "envoy" is the same user in the
// body of envoyproxy/ratelimit's HTTP /json endpoint (a RateLimitRequest of
// domain "bench" with one descriptor entry user_id = the user).
func buildRequests(addr, path string, users []string, hotUser string, hotEvery int, kind string) [][]byte {
	n := 20000
	out := make([][]byte, n)
	for i := 0; i < n; i++ {
		user := users[i%len(users)]
		if hotEvery > 0 && i%hotEvery == hotEvery-1 {
			user = hotUser
		}
		body := fmt.Sprintf(`{"user_id":%q,"method":"GET","path":"/orders"}`, user)
		if kind == "envoy" {
			body = fmt.Sprintf(`{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":%q}]}]}`, user)
		}
		out[i] = []byte(fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			path, addr, len(body), body))
	}
	return out
}

// caller sends one pre-serialised request and reads its answer.
type caller interface {
	call(req []byte, deadline time.Time) (int, error)
	Close() error
}

type http1conn struct {
	c  net.Conn
	rd *bufio.Reader
}

func (h *http1conn) call(req []byte, deadline time.Time) (int, error) {
	_ = h.c.SetDeadline(deadline)
	return roundTrip(h.c, h.rd, req)
}

func (h *http1conn) Close() error { return h.c.Close() }

func (h *h2conn) call(req []byte, deadline time.Time) (int, error) {
	_ = h.c.SetDeadline(deadline)
	return h.roundTrip(req)
}

func dial(proto, addr string, timeout time.Duration) (caller, error) {
	if proto == "grpc" {
		return dialGrpc(addr, timeout)
	}
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &http1conn{c: c, rd: bufio.NewReaderSize(c, 16<<10)}, nil
}

// roundTrip writes one request and reads one response with a
// Content-Length body, returning its status code.
func roundTrip(conn net.Conn, rd *bufio.Reader, req []byte) (int, error) {
	if _, err := conn.Write(req); err != nil {
		return 0, fmt.Errorf("write: %w", simplify(err))
	}
	line, err := rd.ReadSlice('\n')
	if err != nil {
		return 0, fmt.Errorf("read status: %w", simplify(err))
	}
	fields := bytes.Fields(line)
	if len(fields) < 2 {
		return 0, errors.New("malformed status line")
	}
	status, err := strconv.Atoi(string(fields[1]))
	if err != nil {
		return 0, errors.New("malformed status code")
	}
	length := -1
	for {
		h, err := rd.ReadSlice('\n')
		if err != nil {
			return 0, fmt.Errorf("read headers: %w", simplify(err))
		}
		h = bytes.TrimRight(h, "\r\n")
		if len(h) == 0 {
			break
		}
		if k, v, ok := bytes.Cut(h, []byte(":")); ok && strings.EqualFold(string(k), "content-length") {
			length, err = strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				return 0, errors.New("malformed content-length")
			}
		}
	}
	if length < 0 {
		return 0, errors.New("response without content-length")
	}
	if _, err := rd.Discard(length); err != nil {
		return 0, fmt.Errorf("read body: %w", simplify(err))
	}
	return status, nil
}

func simplify(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errors.New("timeout")
	}
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	return err
}

type summary struct {
	Requests     int            `json:"requests"`
	Scheduled    int            `json:"scheduled"`
	RateTarget   float64        `json:"rate_target"`
	Throughput   float64        `json:"throughput"`
	P50Ms        float64        `json:"p50_ms"`
	P90Ms        float64        `json:"p90_ms"`
	P99Ms        float64        `json:"p99_ms"`
	P999Ms       float64        `json:"p999_ms"`
	MaxMs        float64        `json:"max_ms"`
	MeanMs       float64        `json:"mean_ms"`
	ServiceP50Ms float64        `json:"service_p50_ms"`
	ServiceP99Ms float64        `json:"service_p99_ms"`
	ServiceMaxMs float64        `json:"service_max_ms"`
	LagP50Ms     float64        `json:"send_lag_p50_ms"`
	LagP99Ms     float64        `json:"send_lag_p99_ms"`
	StatusCodes  map[string]int `json:"status_codes"`
	Errors       map[string]int `json:"errors"`
	ElapsedSecs  float64        `json:"elapsed_s"`
	DurationSecs float64        `json:"duration_s"`
}

func report(all, service, lags []time.Duration, statuses map[int]int, errs map[string]int, sent int,
	rate float64, duration, elapsed time.Duration, jsonOut string) {
	for _, v := range [][]time.Duration{all, service, lags} {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	}
	quantile := func(v []time.Duration, p float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return float64(v[int(p*float64(len(v)-1))]) / 1e6
	}
	q := func(p float64) float64 { return quantile(all, p) }
	var sum time.Duration
	for _, d := range all {
		sum += d
	}
	s := summary{
		Requests:     len(all),
		Scheduled:    sent,
		RateTarget:   rate,
		Throughput:   float64(len(all)) / duration.Seconds(),
		P50Ms:        q(0.50),
		P90Ms:        q(0.90),
		P99Ms:        q(0.99),
		P999Ms:       q(0.999),
		MaxMs:        q(1),
		ServiceP50Ms: quantile(service, 0.50),
		ServiceP99Ms: quantile(service, 0.99),
		ServiceMaxMs: quantile(service, 1),
		LagP50Ms:     quantile(lags, 0.50),
		LagP99Ms:     quantile(lags, 0.99),
		StatusCodes:  map[string]int{},
		Errors:       errs,
		ElapsedSecs:  elapsed.Seconds(),
		DurationSecs: duration.Seconds(),
	}
	if len(all) > 0 {
		s.MeanMs = float64(sum) / float64(len(all)) / 1e6
	}
	codes := []string{}
	for k, v := range statuses {
		s.StatusCodes[strconv.Itoa(k)] = v
		codes = append(codes, fmt.Sprintf("%d:%d", k, v))
	}
	sort.Strings(codes)
	mode := "max throughput (closed loop)"
	if rate > 0 {
		mode = fmt.Sprintf("fixed rate %.0f req/s (open loop, latency from due time)", rate)
	}
	fmt.Printf("loadgen: %s over %s\n", mode, duration)
	fmt.Printf("  requests   %d answered (%d scheduled), %.0f req/s\n", s.Requests, sent, s.Throughput)
	fmt.Printf("  latency    p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  max %.3f ms  mean %.3f ms\n",
		s.P50Ms, s.P90Ms, s.P99Ms, s.P999Ms, s.MaxMs, s.MeanMs)
	fmt.Printf("  service    p50 %.3f ms  p99 %.3f ms  max %.3f ms  (write to response, without waiting for a due time or a connection)\n",
		s.ServiceP50Ms, s.ServiceP99Ms, s.ServiceMaxMs)
	fmt.Printf("  send lag   p50 %.3f ms  p99 %.3f ms  (due time to write: the generator's own delay or a busy pool)\n",
		s.LagP50Ms, s.LagP99Ms)
	fmt.Printf("  status     %s\n", strings.Join(codes, " "))
	for k, v := range errs {
		fmt.Printf("  error      %d x %s\n", v, k)
	}
	if jsonOut != "" {
		b, _ := json.MarshalIndent(s, "", "  ")
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			fail("writing %s: %v", jsonOut, err)
		}
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(2)
}
