// Package palette holds the colours vmroam's pictures (internal/timeline,
// internal/dashshot) draw their series with, so that both look alike.
package palette

// Tableau10 is Tableau's 10-colour palette, in its order.
var Tableau10 = []string{
	Blue, Orange, Red, Teal, Green, Yellow, Purple, Pink, Brown, Grey,
}

// Tableau 10's colours.
const (
	Blue   = "#4e79a7"
	Orange = "#f28e2b"
	Red    = "#e15759"
	Teal   = "#76b7b2"
	Green  = "#59a14f"
	Yellow = "#edc948"
	Purple = "#b07aa1"
	Pink   = "#ff9da7"
	Brown  = "#9c755f"
	Grey   = "#bab0ac"
)
