"""Layer 2: the prompt-forest text engine (layout, prompt semantics, the text
tower over packed tokens, the forest encoder). Imports only ``ops`` and the
package's base modules."""
