// -partitions N -only P[,P...]: send only users whose Kafka partition (the
// partition a Java client's default partitioner gives the user id as the
// message key, as quotaflow homes limits keyed by user_id) is one of the
// given ones, so a Kafka-mode group can be loaded with users homed on one
// instance (scripts/bench-group.sh).
package main

import (
	"fmt"
	"strconv"
	"strings"
)

// murmur2 is Kafka's Utils.murmur2 (seed 0x9747b28c), as its Java clients
// and librdkafka's murmur2_random compute it.
func murmur2(data []byte) uint32 {
	const (
		seed = 0x9747b28c
		m    = 0x5bd1e995
		r    = 24
	)
	n := len(data)
	h := uint32(seed) ^ uint32(n)
	for i := 0; i+4 <= n; i += 4 {
		k := uint32(data[i]) | uint32(data[i+1])<<8 | uint32(data[i+2])<<16 | uint32(data[i+3])<<24
		k *= m
		k ^= k >> r
		k *= m
		h *= m
		h ^= k
	}
	tail := n &^ 3
	switch n % 4 {
	case 3:
		h ^= uint32(data[tail+2]) << 16
		fallthrough
	case 2:
		h ^= uint32(data[tail+1]) << 8
		fallthrough
	case 1:
		h ^= uint32(data[tail])
		h *= m
	}
	h ^= h >> 13
	h *= m
	h ^= h >> 15
	return h
}

// partitionOf is Kafka's default partition of key among n partitions.
func partitionOf(key string, n int) int {
	return int((murmur2([]byte(key)) & 0x7fffffff) % uint32(n))
}

// partitionFilter keeps user ids whose partition is in a set; the zero
// value keeps every id.
type partitionFilter struct {
	partitions int
	only       map[int]bool
}

func parsePartitionFilter(partitions int, only string) (partitionFilter, error) {
	if only == "" {
		if partitions != 0 {
			return partitionFilter{}, fmt.Errorf("-partitions needs -only")
		}
		return partitionFilter{}, nil
	}
	if partitions < 1 {
		return partitionFilter{}, fmt.Errorf("-only needs -partitions >= 1")
	}
	f := partitionFilter{partitions: partitions, only: map[int]bool{}}
	for _, s := range strings.Split(only, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || p < 0 || p >= partitions {
			return partitionFilter{}, fmt.Errorf("-only: %q is not a partition of 0..%d", s, partitions-1)
		}
		f.only[p] = true
	}
	return f, nil
}

func (f partitionFilter) keeps(user string) bool {
	return f.only == nil || f.only[partitionOf(user, f.partitions)]
}

// userNames returns the ordinary users the bodies cycle over, "user-%05d"
// numbered from 0, and the hot user, "hot-user": without a filter exactly
// those; with one, the first `users` numbers whose id the filter keeps, and
// the first of "hot-user", "hot-user-1", "hot-user-2", ... that it keeps.
func userNames(users int, f partitionFilter) ([]string, string) {
	names := make([]string, 0, users)
	for k := 0; len(names) < users; k++ {
		if name := fmt.Sprintf("user-%05d", k); f.keeps(name) {
			names = append(names, name)
		}
	}
	hot := "hot-user"
	for k := 1; !f.keeps(hot); k++ {
		hot = "hot-user-" + strconv.Itoa(k)
	}
	return names, hot
}
