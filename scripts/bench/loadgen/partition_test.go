package main

import "testing"

// Kafka's own test vectors for Utils.murmur2 (as int32), and the partition
// quotaflow's partitioner gives (crates/quotaflow-core/src/pipeline/partitioner.rs).
func TestMurmur2LikeKafka(t *testing.T) {
	for _, c := range []struct {
		key  string
		want int32
	}{{"21", -973932308}, {"foobar", -790332482}} {
		if got := int32(murmur2([]byte(c.key))); got != c.want {
			t.Errorf("murmur2(%q) = %d, want %d", c.key, got, c.want)
		}
	}
	if got, want := partitionOf("21", 7), 1173551340%7; got != want {
		t.Errorf("partitionOf(\"21\", 7) = %d, want %d", got, want)
	}
	if partitionOf("21", 1) != 0 {
		t.Error("one partition: always 0")
	}
}

func TestUserNamesFiltered(t *testing.T) {
	all, hot := userNames(3, partitionFilter{})
	if all[0] != "user-00000" || all[2] != "user-00002" || hot != "hot-user" {
		t.Fatalf("unfiltered names changed: %v %q", all, hot)
	}
	for p := 0; p < 2; p++ {
		f, err := parsePartitionFilter(2, string(rune('0'+p)))
		if err != nil {
			t.Fatal(err)
		}
		names, hot := userNames(1000, f)
		if len(names) != 1000 {
			t.Fatalf("partition %d: %d names", p, len(names))
		}
		for _, n := range append(names, hot) {
			if partitionOf(n, 2) != p {
				t.Fatalf("%q is on partition %d, not %d", n, partitionOf(n, 2), p)
			}
		}
	}
	if _, err := parsePartitionFilter(2, "2"); err == nil {
		t.Error("-only 2 of 2 partitions accepted")
	}
	if _, err := parsePartitionFilter(0, "0"); err == nil {
		t.Error("-only without -partitions accepted")
	}
}
