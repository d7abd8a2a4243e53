//! Which instruction set the hand-written kernels use, chosen at run time.
//!
//! One binary runs on every x86-64 machine the build targets: kernels for
//! wider instruction sets are compiled with `#[target_feature]` and only
//! called after the CPU was checked to have them. [`Isa::chosen`] is the
//! widest the CPU has, or a narrower one named in `MYCEL_KERNELS`
//! (`avx512`, `avx2`, `portable`), so one machine can run, compare and
//! benchmark every path it is able to.

use std::sync::OnceLock;

/// An instruction set a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, vectorised by the compiler for the build's target.
    Portable,
    /// x86-64 AVX2 with FMA: 16 registers of 8 f32.
    Avx2,
    /// x86-64 AVX-512 (F, BW, DQ, VL: every AVX-512 CPU since Skylake-SP
    /// and Zen 4): 32 registers of 16 f32.
    Avx512,
}

impl Isa {
    /// Every instruction set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name `MYCEL_KERNELS` takes and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run kernels written for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The instruction sets this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// The widest instruction set this CPU has.
    pub fn widest() -> Isa {
        Isa::ALL.into_iter().rev().find(|isa| isa.supported()).unwrap_or(Isa::Portable)
    }

    /// What the kernels use in this process: [`Self::widest`], or the
    /// narrower set `MYCEL_KERNELS` names. A name the CPU cannot run, or
    /// an unknown one, is reported once and the widest set used.
    pub fn chosen() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let widest = Isa::widest();
            let Ok(wanted) = std::env::var("MYCEL_KERNELS") else { return widest };
            match Isa::ALL.into_iter().find(|isa| isa.name() == wanted) {
                Some(isa) if isa.supported() => isa,
                Some(isa) => {
                    tracing::warn!(wanted = isa.name(), using = widest.name(), "MYCEL_KERNELS: this CPU lacks it");
                    widest
                }
                None => {
                    tracing::warn!(%wanted, using = widest.name(), "MYCEL_KERNELS: expected avx512, avx2 or portable");
                    widest
                }
            }
        })
    }
}

/// Defines a function whose body is written once and compiled twice: for
/// the build's baseline, and for AVX-512, which runs where
/// [`Isa::chosen`] is [`Isa::Avx512`]. For the loops the compiler
/// vectorises (element-wise kernels): they get 16 lanes where the CPU has
/// them, with no hand-written intrinsics.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::simd::Isa::chosen() == $crate::simd::Isa::Avx512 {
                    // SAFETY: `chosen` is AVX-512 only on a CPU that has it.
                    #[allow(unsafe_code)]
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_is_always_available_and_the_widest_is_chosen_by_default() {
        let available = Isa::available();
        assert_eq!(available.first(), Some(&Isa::Portable));
        assert_eq!(available.last(), Some(&Isa::widest()));
        if std::env::var_os("MYCEL_KERNELS").is_none() {
            assert_eq!(Isa::chosen(), Isa::widest());
        }
    }
}
